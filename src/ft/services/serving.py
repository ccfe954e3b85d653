"""`ft serve`: which models of the workspace can be served, how each loads, and the server's settings.

A request names a model by id. The ids are the workspace's base models (models/<name>, as in
the registry) and its tuned runs (runs/<id>, served from their `best` checkpoint, else `latest`,
else the newest one). Nothing else can be loaded: ids are looked up, never used as paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from ft.config.secrets import load_secrets
from ft.config.settings import load_settings
from ft.errors import ErrorCode, FtError
from ft.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from ft.server.source import LoadedModel, ModelInfo
from ft.workspace import Workspace, validate_name

log = logging.getLogger("ft.server")

CHECKPOINTS = "checkpoints"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
POINTERS = ("best", "latest")
_STEP_RE = re.compile(r"^step-\d+$")
# config.json keys that hold the context length, by architecture family.
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "n_ctx")


class ServeOptions(BaseModel):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: str | None = None
    adapter: str | None = None  # RUN or RUN:CHECKPOINT
    max_models: int = 1
    max_queue: int = 16
    max_tokens: int | None = None
    timeout: float = 600.0
    max_body_mb: float = 1.0
    cors_origins: list[str] = []
    log_prompts: bool = False
    keep_quantized: bool = False


class ServeInfo(BaseModel):
    """What the server is about to serve (shown at start-up)."""

    url: str = ""
    default_model: str
    models: list[ModelInfo]
    auth: bool
    host: str


def _mtime_key(*paths: Path) -> str:
    parts = []
    for p in paths:
        try:
            st = p.stat()
            parts.append(f"{p}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append(f"{p}:missing")
    return "|".join(parts)


def _created(row: dict[str, Any] | None, path: Path) -> int:
    if row and row.get("created_at"):
        try:
            return int(datetime.fromisoformat(row["created_at"]).timestamp())
        except ValueError:
            pass
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _inside(path: Path, *roots: Path, follow_links: bool = True) -> bool:
    """``path`` is one of ``roots`` or below one (symlinks followed, or only '..' removed)."""
    norm = (lambda p: p.resolve()) if follow_links else (lambda p: Path(os.path.abspath(p)))
    rp = norm(path)
    return any(rp == norm(r) or norm(r) in rp.parents for r in roots)


def resolve_checkpoint(run_dir: Path, which: str | None = None) -> Path | None:
    """The checkpoint folder of a run: ``which`` (a step folder or pointer name), else best, latest, newest."""
    ckpts = run_dir / CHECKPOINTS
    if not ckpts.is_dir():
        return None

    def valid(p: Path) -> bool:
        return p.is_dir() and (p / ADAPTER_WEIGHTS).is_file() and _inside(p, ckpts)

    def follow(name: str) -> Path | None:
        p = ckpts / name
        if p.is_symlink() or p.is_dir():
            target = p.resolve()
        elif p.is_file():  # a pointer file naming the folder (plain text or {"name"/"path": ...})
            text = p.read_text(encoding="utf-8", errors="replace").strip()
            try:
                data = json.loads(text)
                text = (
                    str(data.get("name") or data.get("path") or data.get("checkpoint") or "")
                    if isinstance(data, dict)
                    else str(data)
                )
            except json.JSONDecodeError:
                pass
            if not text:
                return None
            target = (ckpts / Path(text).name) if not Path(text).is_absolute() else Path(text)
        else:
            return None
        return target if valid(target) else None

    if which is not None:
        return follow(which)
    for name in POINTERS:
        hit = follow(name)
        if hit is not None:
            return hit
    steps = sorted((p for p in ckpts.iterdir() if _STEP_RE.match(p.name) and valid(p)), key=lambda p: p.name)
    return steps[-1] if steps else None


class WorkspaceModels:
    """The :class:`ft.server.source.ModelSource` of a workspace."""

    def __init__(self, ws: Workspace, *, keep_quantized: bool = False, extra_checkpoints: Sequence[str] = ()):
        self.ws = ws
        self.keep_quantized = keep_quantized
        self.extra = list(extra_checkpoints)  # "RUN:CHECKPOINT" ids asked for with --adapter
        settings = load_settings()
        self._roots = [ws.models_dir] + ([settings.models_cache] if settings.models_cache else [])

    # -- listing ---------------------------------------------------------------------------------
    def _base_models(self) -> dict[str, tuple[Path, dict[str, Any] | None]]:
        found: dict[str, tuple[Path, dict[str, Any] | None]] = {}
        rows = self.ws.registry().list("models") if self.ws.db_path.exists() else []
        for row in rows:
            path = Path(row.get("meta", {}).get("path") or self.ws.model_dir(row["name"]))
            if (path / "config.json").is_file() and _inside(path, *self._roots, follow_links=False):
                found[row["name"]] = (path, row)
        if self.ws.models_dir.is_dir():
            for p in sorted(self.ws.models_dir.iterdir()):
                if p.name not in found and (p / "config.json").is_file():
                    try:
                        found[validate_name(p.name)] = (p, None)
                    except FtError:
                        continue
        return found

    def _run_base(
        self, run_dir: Path, ckpt: Path, row: dict[str, Any] | None, bases: dict[str, Any]
    ) -> str | None:
        """The workspace base model a run was trained on (by name; hub ids matched against the registry's source)."""
        candidates: list[Any] = []
        try:
            cfg = json.loads((ckpt / ADAPTER_CONFIG).read_text())
        except (OSError, json.JSONDecodeError):
            cfg = {}
        for d in (
            cfg,
            cfg.get("base_model") if isinstance(cfg.get("base_model"), dict) else {},
            (row or {}).get("meta", {}),
        ):
            for key in ("base_model", "base_model_name", "model_name", "name", "model", "base"):
                v = d.get(key) if isinstance(d, dict) else None
                if isinstance(v, str):
                    candidates.append(v)
                elif isinstance(v, dict):
                    candidates += [v.get("name"), v.get("id")]
        for c in candidates:
            if isinstance(c, str) and c in bases:
                return c
        for c in candidates:
            for name, (_, brow) in bases.items():
                if (
                    isinstance(c, str)
                    and brow
                    and c in (brow.get("source"), brow.get("meta", {}).get("source"))
                ):
                    return name
        return None

    def _tuned(self, bases: dict[str, Any]) -> list[ModelInfo]:
        out: list[ModelInfo] = []
        rows = {r["id"]: r for r in (self.ws.registry().list("runs") if self.ws.db_path.exists() else [])}
        ids = list(rows)
        if self.ws.runs_dir.is_dir():
            ids += sorted(p.name for p in self.ws.runs_dir.iterdir() if p.is_dir() and p.name not in rows)
        wanted = [(i, None) for i in ids] + [tuple(e.split(":", 1)) for e in self.extra]
        for run_id, which in wanted:
            try:
                run_dir = self.ws.run_dir(run_id)
                if which is not None:
                    validate_name(which, "checkpoint")
            except FtError:
                continue
            ckpt = resolve_checkpoint(run_dir, which)
            if ckpt is None:
                continue
            base = self._run_base(run_dir, ckpt, rows.get(run_id), bases)
            if base is None:
                log.debug("run %s: base model not found in this workspace; not served", run_id)
                continue
            out.append(
                ModelInfo(
                    id=run_id if which is None else f"{run_id}:{which}",
                    kind="tuned",
                    created=_created(rows.get(run_id), run_dir),
                    base=base,
                    checkpoint=ckpt.name,
                    run=run_id,
                    fingerprint=_mtime_key(ckpt / ADAPTER_WEIGHTS, bases[base][0] / "config.json"),
                )
            )
        # A run can also be named by its --name (the newest run of that name), unless that is ambiguous.
        taken = set(bases) | {m.id for m in out}
        named: dict[str, ModelInfo] = {}
        for m in sorted((m for m in out if m.id == m.run), key=lambda m: m.created):
            name = (rows.get(m.id) or {}).get("name")
            if name and name not in taken:
                named[name] = m.model_copy(update={"id": name})
        return out + list(named.values())

    def models(self) -> list[ModelInfo]:
        bases = self._base_models()
        infos = [
            ModelInfo(
                id=name,
                kind="base",
                created=_created(row, path),
                fingerprint=_mtime_key(path / "config.json"),
            )
            for name, (path, row) in bases.items()
        ]
        return infos + self._tuned(bases)

    # -- loading ---------------------------------------------------------------------------------
    def load(self, info: ModelInfo) -> LoadedModel:
        from ft.models.loading import load_model_dir

        bases = self._base_models()
        base_name = info.id if info.kind == "base" else info.base
        if base_name not in bases:
            raise FtError(ErrorCode.NOT_FOUND, f"base model {base_name!r} is no longer in the workspace")
        path = bases[base_name][0]
        loaded = load_model_dir(path, dequantize=False if self.keep_quantized else None)
        model = loaded.model
        if info.kind == "tuned":
            run_id, _, which = info.id.partition(":")
            run_id = info.run or run_id
            ckpt = resolve_checkpoint(self.ws.run_dir(run_id), which or None)
            if ckpt is None:
                raise FtError(ErrorCode.CHECKPOINT_INVALID, f"run {run_id} has no usable checkpoint any more")
            apply_checkpoint(model, ckpt, base_name, path)
        model.eval()  # adapter layers are created in training mode (dropout on)
        ctx = next(
            (int(loaded.config[k]) for k in _CONTEXT_KEYS if isinstance(loaded.config.get(k), int)), None
        )
        return LoadedModel(info=info, model=model, tokenizer=loaded.tokenizer, context_length=ctx)


def apply_checkpoint(model: Any, ckpt: Path, base: str, base_dir: Path) -> None:
    """Put a checkpoint's adapters (or full weights) onto ``model`` in place, as `ft evaluate` does:
    every tensor name and shape checked, a QLoRA base quantized as in training, dropout off."""
    from ft.services import checkpoints

    try:
        cfg = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FtError(ErrorCode.CHECKPOINT_INVALID, f"{ckpt / ADAPTER_CONFIG}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise FtError(ErrorCode.CHECKPOINT_INVALID, f"{ckpt / ADAPTER_CONFIG} is not a JSON object")
    step = ckpt.name.split("-")[-1]
    resolved = checkpoints.ResolvedCheckpoint(
        run_id=ckpt.parent.parent.name,
        name=ckpt.name,
        path=str(ckpt),
        step=int(step) if step.isdigit() else None,
        base_model=base,
        base_model_dir=str(base_dir),
        adapter_config=cfg,
    )
    checkpoints.apply_checkpoint(model, resolved)


def _default_model(ws: Workspace, models: list[ModelInfo], opts: ServeOptions) -> str:
    ids = {m.id: m for m in models}
    if not ids:
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"there is no model to serve in {ws.root}",
            "pull one first: ft models pull smollm2-135m-instruct",
        )
    if opts.adapter:
        run = opts.adapter
        if run not in ids:
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"--adapter {run}: no run with a usable checkpoint by that name",
                f"servable: {', '.join(ids)}",
            )
        if opts.model and ids[run].base != opts.model:
            raise FtError(
                ErrorCode.USAGE,
                f"--adapter {run} was trained on {ids[run].base!r}, not {opts.model!r}",
                "leave out --model: the run's own base model is used",
            )
        return run
    if opts.model:
        if opts.model not in ids:
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"--model {opts.model}: not in this workspace",
                f"servable: {', '.join(ids)}",
            )
        return opts.model
    tuned = sorted((m for m in models if m.kind == "tuned" and m.id == m.run), key=lambda m: m.created)
    if tuned:
        return tuned[-1].id  # the newest tune: `ft serve` after `ft train` serves what was just trained
    return models[0].id


def prepare(ws: Workspace, opts: ServeOptions) -> tuple[ServerConfig, WorkspaceModels, ServeInfo]:
    """Check the options against the workspace; everything `ft serve` needs before it listens."""
    if opts.adapter and ":" in opts.adapter:
        run, _, which = opts.adapter.partition(":")
        validate_name(which, "checkpoint")
        if not ws.run_dir(run).is_dir():  # a run name: its newest run
            named = [r["id"] for r in ws.registry().list("runs") if r.get("name") == run]
            run = named[-1] if named else run
        opts = opts.model_copy(update={"adapter": f"{run}:{which}"})
    source = WorkspaceModels(
        ws,
        keep_quantized=opts.keep_quantized,
        extra_checkpoints=[opts.adapter] if opts.adapter and ":" in opts.adapter else [],
    )
    models = source.models()
    default = _default_model(ws, models, opts)
    key: SecretStr | None = load_secrets(ws).serve_api_key
    config = ServerConfig(
        host=opts.host,
        port=opts.port,
        api_key=key,
        default_model=default,
        max_models=opts.max_models,
        max_queue=opts.max_queue,
        max_tokens=opts.max_tokens,
        request_timeout=opts.timeout,
        max_body_bytes=int(opts.max_body_mb * (1 << 20)),
        cors_origins=tuple(opts.cors_origins),
        log_prompts=opts.log_prompts,
    )
    return (
        config,
        source,
        ServeInfo(default_model=default, models=models, auth=key is not None, host=opts.host),
    )


def serve(
    ws: Workspace, opts: ServeOptions, on_listening: Callable[[ServeInfo], None] | None = None
) -> ServeInfo:
    """Run the server until interrupted (blocks). Refuses an exposed host without an API key before loading anything."""
    from ft.server.run import check_exposure, run_server

    config, source, info = prepare(ws, opts)
    check_exposure(config)

    def listening(url: str) -> None:
        info.url = url
        if on_listening is not None:
            on_listening(info)

    run_server(config, source, on_listening=listening)
    return info
