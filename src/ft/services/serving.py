"""`ft serve`: which models of the workspace can be served, how each loads, and the server's settings.

A request names a model by id. The ids are the workspace's base models (models/<name>, as in
the registry) and its tuned runs (runs/<id>, served from their `best` checkpoint, else `latest`,
else the newest one: :func:`ft.services.checkpoints.resolve_checkpoint`, the resolver, manifest check and
base-model lookup `ft evaluate` and `ft export` use). Nothing else can be loaded: ids are looked up,
never used as paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr

from ft.config.secrets import load_secrets
from ft.config.settings import load_settings
from ft.errors import ErrorCode, FtError
from ft.server.config import DEFAULT_HOST, DEFAULT_MAX_TOKENS_CHAT, DEFAULT_PORT, ServerConfig
from ft.server.source import LoadedModel, ModelInfo, ToolSupport
from ft.services.checkpoints import ResolvedCheckpoint, apply_checkpoint, resolve_checkpoint
from ft.workspace import Workspace, validate_name
from ft.workspace.run_folder import ADAPTERS

log = logging.getLogger("ft.server")

# config.json keys that hold the context length, by architecture family.
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "n_ctx")


class ServeOptions(BaseModel):
    """What `ft serve` serves and how; each field's docstring is its flag's help text."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)  # `ft serve` passes them by name

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: str | None = None
    """Default model (base model or run id)."""
    adapter: str | None = None
    """Serve this tuned run by default: RUN or RUN:step-000100."""
    max_models: int = 1
    """Models kept in memory (LRU)."""
    max_queue: int = 16
    """Requests waiting beyond those generating; more get 429."""
    max_batch: int = 16
    """Requests for one model generated together (continuous batching)."""
    prefill_chunk: int = 512
    """Prompt tokens read per step, between decoding steps of the others (a client leaving stops its prompt
    within one chunk)."""
    max_tokens: int | None = None
    """Cap on tokens generated per request (default: the context left)."""
    max_tokens_default: int = DEFAULT_MAX_TOKENS_CHAT
    """Tokens a chat may generate when the request sets no max_tokens."""
    max_client_requests: int = 32
    """Requests one client address may have in progress (429 beyond)."""
    header_timeout: float = 10.0
    """Seconds a connection may take to send a request head (idle connections are closed after)."""
    timeout: float = 600.0
    """Seconds a request may take, queue included (504 after)."""
    max_body_mb: float = 1.0
    """Largest request body (413 beyond)."""
    cors_origins: list[str] = []
    """Allow browser apps from this origin (repeatable); CORS is off by default."""
    log_prompts: bool = False
    """Also log prompt and completion text (off by default)."""
    keep_quantized: bool = False
    """Keep quantized weights as stored (on CPU they are dequantized when they fit)."""


# Options the server takes as they are, under the same name (the rest are converted in prepare).
_SERVER_OPTIONS = set(ServeOptions.model_fields) & set(ServerConfig.model_fields)


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


class WorkspaceModels:
    """The :class:`ft.server.source.ModelSource` of a workspace."""

    def __init__(self, ws: Workspace, *, keep_quantized: bool = False, extra_checkpoints: Sequence[str] = ()):
        self.ws = ws
        self.keep_quantized = keep_quantized
        self.extra = list(extra_checkpoints)  # "RUN:CHECKPOINT" ids asked for with --adapter
        self.broken: dict[str, FtError] = {}  # runs whose checkpoint is damaged: why (as ft evaluate says it)
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

    def _tuned(self, bases: dict[str, Any]) -> list[ModelInfo]:
        out: list[ModelInfo] = []
        self.broken = {}
        rows = {r["id"]: r for r in (self.ws.registry().list("runs") if self.ws.db_path.exists() else [])}
        ids = list(rows)
        if self.ws.runs_dir.is_dir():
            ids += sorted(p.name for p in self.ws.runs_dir.iterdir() if p.is_dir() and p.name not in rows)
        wanted = [(i, None) for i in ids] + [tuple(e.split(":", 1)) for e in self.extra]
        for run_id, which in wanted:
            model_id = run_id if which is None else f"{run_id}:{which}"
            try:
                if which is not None:
                    validate_name(which, "checkpoint")
                ckpt = resolve_checkpoint(self.ws, run_id, which or "best")
            except FtError as e:
                if e.code == ErrorCode.CHECKPOINT_INVALID:
                    log.warning("run %s: %s; not served", run_id, e.message)
                    self.broken[model_id] = e
                continue
            if ckpt.base_model_id not in bases:
                log.debug("run %s: base model not found in this workspace; not served", run_id)
                continue
            out.append(
                ModelInfo(
                    id=model_id,
                    kind="tuned",
                    created=_created(rows.get(run_id), self.ws.run_dir(run_id)),
                    base=ckpt.base_model_id,
                    checkpoint=ckpt.name,
                    run=run_id,
                    fingerprint=_mtime_key(
                        Path(ckpt.path) / ADAPTERS, bases[ckpt.base_model_id][0] / "config.json"
                    ),
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
    def checkpoint(self, info: ModelInfo) -> ResolvedCheckpoint:
        """The checkpoint a tuned model id serves (resolved and verified as `ft evaluate` does)."""
        assert info.run is not None
        return resolve_checkpoint(self.ws, info.run, info.checkpoint or "best")

    def load(self, info: ModelInfo) -> LoadedModel:
        """Load a base model (a tuned run asked for directly: its base with the adapters; the server's
        pool builds tuned runs on a loaded base with :meth:`adapt` instead)."""
        from ft.models.loading import load_for

        bases = self._base_models()
        base_name = info.id if info.kind == "base" else info.base
        if base_name not in bases:
            raise FtError(ErrorCode.NOT_FOUND, f"base model {base_name!r} is no longer in the workspace")
        path, row = bases[base_name]
        if info.kind == "tuned":
            # The checkpoint listed, checked again: it may have been damaged or pruned since.
            ckpt = self.checkpoint(info)
            loaded = ckpt.load_base("serve", keep_quantized=self.keep_quantized)
            apply_checkpoint(loaded.model, ckpt)
        else:
            trusted = bool(((row or {}).get("meta") or {}).get("trust_remote_code"))
            loaded = load_for(path, "serve", trust_remote_code=trusted, keep_quantized=self.keep_quantized)
        model = loaded.model
        model.eval()  # adapter layers are created in training mode (dropout on)
        ctx = next(
            (int(loaded.config[k]) for k in _CONTEXT_KEYS if isinstance(loaded.config.get(k), int)), None
        )
        return LoadedModel(
            info=info,
            model=model,
            tokenizer=loaded.tokenizer,
            context_length=ctx,
            tools=tool_support(loaded.tokenizer, base_name),
        )

    def adapt(self, base: LoadedModel, info: ModelInfo) -> LoadedModel:
        """The tuned run ``info`` over the loaded ``base``: a module tree sharing the base's weight arrays
        with the run's adapters attached (one copy of the base in memory for base and tuned)."""
        from ft.models.loading import share_weights

        # The checkpoint listed, checked again: it may have been damaged or pruned since.
        ckpt = self.checkpoint(info)
        model = share_weights(base.model)
        apply_checkpoint(model, ckpt)
        model.eval()  # adapter layers are created in training mode (dropout on)
        return LoadedModel(
            info=info,
            model=model,
            tokenizer=base.tokenizer,
            context_length=base.context_length,
            tools=base.tools,
        )


def tool_support(tokenizer: Any, model_name: str) -> ToolSupport | None:
    """Tools for a served model: rendered by its chat template as training renders them (the template's own
    tool format, or ft's fallback where it has none) and calls parsed back from the generated text.

    None when the model has no chat template (requests with tools then get a 400).
    """
    from ft.data.formats import Format, normalize
    from ft.data.templates import make_template
    from ft.data.toolcalls import CALL_MARKERS, openai_tool_calls, parse_tool_calls
    from ft.data.validate import RecordError

    source = getattr(tokenizer, "chat_template", None)
    if not source:
        return None
    special = {
        "bos_token": getattr(tokenizer, "bos_token", None),
        "eos_token": getattr(tokenizer, "eos_token", None),
    }
    template = make_template("model", source, special, model_name)
    style = template.tool_style

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        # The same checks and normal form as a training record (a closing assistant turn stands in
        # for the answer to generate, and is dropped).
        record: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": "-"}]}
        if tools:
            record["tools"] = tools
        try:
            example = normalize(record, Format.CHAT)
            text = template.render(list(example.messages or ())[:-1], True, example.tools)
        except (RecordError, FtError) as e:
            raise ValueError(str(getattr(e, "message", None) or e)) from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    def parse(text: str) -> tuple[str | None, list[dict[str, Any]], str | None]:
        out = parse_tool_calls(text, style)
        return out.content, openai_tool_calls(out.tool_calls), out.error

    return ToolSupport(style=style, render=render, parse=parse, markers=CALL_MARKERS[style])


def _newest_run(ws: Workspace) -> str | None:
    rows = ws.registry().list("runs") if ws.db_path.exists() else []
    return str(rows[-1]["id"]) if rows else None


def _default_model(
    ws: Workspace, models: list[ModelInfo], opts: ServeOptions, broken: dict[str, FtError] | None = None
) -> str:
    broken = broken or {}
    ids = {m.id: m for m in models}
    if not ids:
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"there is no model to serve in {ws.root}",
            "pull one first: ft models pull smollm2-135m-instruct",
        )
    if opts.adapter:
        run = opts.adapter
        if run not in ids and run in broken:
            raise broken[run]
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
    newest = _newest_run(ws)
    if newest in broken and (not tuned or tuned[-1].id != newest):
        raise broken[newest]  # `ft serve` after `ft train` serves that run, or says why not (as ft evaluate)
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
    default = _default_model(ws, models, opts, source.broken)
    key: SecretStr | None = load_secrets(ws).serve_api_key
    config = ServerConfig(
        **opts.model_dump(include=_SERVER_OPTIONS),
        api_key=key,
        default_model=default,
        request_timeout=opts.timeout,
        max_body_bytes=int(opts.max_body_mb * (1 << 20)),
    )
    # An empty serve_api_key (the passwords.yml template's "") is no key: ServerConfig makes it None.
    return (
        config,
        source,
        ServeInfo(default_model=default, models=models, auth=config.api_key is not None, host=opts.host),
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
