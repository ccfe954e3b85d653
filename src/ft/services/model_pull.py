"""`ft models pull`: bring a model into the workspace (GGUF import, local folder, Hugging Face download),
convert it when asked, check that it loads, hash its weights and register it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft.errors import ErrorCode, FtError
from ft.models import catalog as cat
from ft.models.convert import Precision
from ft.services.models import (
    MODEL_MANIFEST,
    STAGING_PREFIX,
    ModelRecord,
    PullResult,
    _folder,
    _now,
    get_model,
)
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir, atomic_write_json, clean_leftovers

log = logging.getLogger("ft.services.models")


# ----------------------------------------------------------------------------------------- pull
def download_progress(update: Callable[[int, int | None], None]) -> type:
    """A tqdm class for :func:`pull` that reports (bytes done, bytes total) to ``update``."""
    from ft.models.hub import progress_tqdm

    return progress_tqdm(update)


def _describe(folder: Path, meta: dict[str, Any]) -> ModelRecord:
    from ft.models.architectures import architecture_of
    from ft.models.inspect import inspect_folder, weight_hashes

    info = inspect_folder(folder)
    arch = architecture_of(
        info.config, where=str(folder / "config.json"), trust_remote_code=bool(meta.get("trust_remote_code"))
    )
    return ModelRecord(
        **meta,
        path=str(folder),
        architecture=arch.model_type,
        parameters=info.parameters(),
        quantization=info.quantization_summary(),
        dtype=info.float_dtype(),
        size_bytes=info.size_bytes,
        sha256=weight_hashes(folder),
    )


def _verify_loadable(folder: Path, trust_remote_code: bool) -> None:
    """Build the model and check every weight name and shape (lazily: no weight data is read)."""
    from mlx_lm.utils import load_model

    try:
        load_model(folder, lazy=True, strict=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{folder.name}: the weights do not match the architecture: {e}",
            "the source may be incomplete or of an unsupported variant",
        ) from None


def _link_into_workspace(ws: Workspace, name: str, folder: Path) -> None:
    link = ws.models_dir / name
    if folder.parent.resolve() == ws.models_dir.resolve():
        return
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)


def _already_pulled(
    ws: Workspace, name: str, folder: Path, wanted: dict[str, Any], step: Callable[[str], None]
) -> ModelRecord | None:
    """The record when ``name`` is pulled already from the same source (adopted from the shared cache
    when needed); None when it is not there; FtError when the name is taken by another source."""
    reg = ws.registry()
    row = reg.get("models", name=name)
    if row is not None and not (folder / "config.json").is_file() and not folder.exists():
        reg.delete("models", name=name)  # its folder was deleted by hand: pull it afresh
        row = None
    if row is not None or folder.exists() or (ws.models_dir / name).is_symlink():
        manifest = folder / MODEL_MANIFEST
        present = json.loads(manifest.read_text()) if manifest.is_file() else (row["meta"] if row else {})
        same = all(present.get(k) == v for k, v in wanted.items())
        if same and (folder / "config.json").is_file():
            if row is None:  # e.g. in the shared cache from another workspace: adopt it
                record = ModelRecord(**{**present, "name": name, "path": str(folder)})
                reg.upsert(
                    "models", {"name": name}, source=record.source, meta=record.model_dump(exclude={"name"})
                )
                _link_into_workspace(ws, name, folder)
                step(f"found {name} in {folder.parent}; registered it in this workspace")
            else:
                step(f"{name} is already pulled ({folder})")
            return get_model(ws, name)
        raise FtError(
            ErrorCode.ALREADY_EXISTS,
            f"a model named {name!r} already exists (from {present.get('source', 'an unknown source')})",
            f"choose another name with --name, or remove it first: ft models rm {name} --yes",
        )

    return None


def _fetch(
    ws: Workspace,
    src: Any,
    name: str,
    folder: Path,
    revision: str | None,
    convert: bool,
    trust_remote_code: bool,
    tqdm_class: Any,
    step: Callable[[str], None],
    finish: Callable[[Path, Path | None], None],
    meta: dict[str, Any],
) -> None:
    """Bring the source's files into ``folder`` (atomically): a GGUF import, a local copy or a download."""
    from ft.models.gguf_import import import_gguf

    root = folder.parent
    if src.kind in ("embedded", "gguf"):
        from ft.models.embedded import embedded_gguf_path

        gguf = embedded_gguf_path() if src.kind == "embedded" else Path(src.value)
        with atomic_dir(folder) as tmp:
            if convert:
                scratch = root / f"{STAGING_PREFIX}{name}-gguf"
                shutil.rmtree(scratch, ignore_errors=True)
                step(f"importing {gguf.name}")
                import_gguf(gguf, scratch)
                try:
                    finish(tmp, scratch)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            else:
                step(f"importing {gguf.name} (weights kept quantized as stored)")
                import_gguf(gguf, tmp, overwrite=True)
                finish(tmp, None)
    elif src.kind == "local_dir":
        from ft.models.architectures import architecture_of
        from ft.models.inspect import check_loadable_folder

        local = Path(src.value)
        check_loadable_folder(local)
        architecture_of(
            json.loads((local / "config.json").read_text()),
            where=str(local / "config.json"),
            trust_remote_code=trust_remote_code,
        )
        step(f"copying {local}")
        with atomic_dir(folder) as tmp:
            finish(tmp, local)
    else:
        from ft.config.secrets import load_secrets
        from ft.models.hub import pull_repo

        secret = load_secrets(ws).hf_token
        staging = root / f"{STAGING_PREFIX}{name}"
        step(f"downloading {src.value}" + (f" at {revision}" if revision else "") + f" into {staging}")
        try:
            hub = pull_repo(
                src.value,
                staging,
                revision=revision,
                token=secret.get_secret_value() if secret else None,
                trust_remote_code=trust_remote_code,
                tqdm_class=tqdm_class,
            )
        except FtError:
            # Keep finished files for the next attempt; a staging folder with nothing in it is just clutter.
            if not any(
                p.is_file() for p in staging.rglob("*") if ".cache" not in p.relative_to(staging).parts
            ):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        meta["commit"] = hub.commit
        step(f"downloaded {len(hub.files)} files at commit {hub.commit[:12]}")
        if convert:
            with atomic_dir(folder) as tmp:
                finish(tmp, staging)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            # No copy of gigabytes: the staging folder itself becomes the model folder.
            shutil.rmtree(staging / ".cache", ignore_errors=True)
            finish(staging, None)
            os.replace(staging, folder)


def pull(
    ws: Workspace,
    source: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    quantize: int | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    tqdm_class: Any = None,
    on_step: Callable[[str], None] | None = None,
) -> PullResult:
    """Bring a model into the workspace; pulling the same thing again is a no-op that says so."""
    to = Precision(quantize, dtype)
    src = cat.resolve_source(source)
    if revision and src.kind != "hf":
        raise FtError(
            ErrorCode.USAGE,
            "--revision applies to Hugging Face repositories only",
            f"{source} is a {src.kind.replace('_', ' ')} source; drop --revision",
        )
    name = validate_name(name or (src.default_name + to.name_suffix), "model name")
    steps: list[str] = []

    def step(text: str) -> None:
        steps.append(text)
        log.info(text)
        if on_step:
            on_step(text)

    wanted = {
        "source": src.value if src.kind == "hf" else (src.entry.name if src.entry else src.value),
        "kind": src.kind,
        "revision": revision,
        "quantize": quantize,
        "converted_dtype": dtype,
    }
    folder = _folder(ws, name)
    done = _already_pulled(ws, name, folder, wanted, step)
    if done is not None:
        return PullResult(model=done, already_present=True, steps=steps)
    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)
    convert = to.converts
    meta: dict[str, Any] = {
        **wanted,
        "name": name,
        "commit": None,
        "trust_remote_code": trust_remote_code,
        "pulled_at": _now(),
    }

    from ft.models.convert import convert as convert_folder
    from ft.models.convert import copy_model_files

    described: list[ModelRecord] = []  # what finish() found, so gigabytes are hashed once

    def finish(tmp: Path, from_dir: Path | None) -> None:
        if from_dir is not None:
            if convert:
                step(f"converting ({to.describe()})")
                convert_folder(from_dir, tmp, to, trust_remote_code)
            else:
                copy_model_files(from_dir, tmp, with_code=trust_remote_code)
        step("checking every weight name and shape against the architecture")
        _verify_loadable(tmp, trust_remote_code)
        step("hashing weights (sha256)")
        record = _describe(tmp, meta)
        atomic_write_json(tmp / MODEL_MANIFEST, record.model_dump(exclude={"path", "name"}))
        described.append(record)

    _fetch(ws, src, name, folder, revision, convert, trust_remote_code, tqdm_class, step, finish, meta)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    record = described[-1].model_copy(update={"path": str(folder), "size_bytes": size})
    _link_into_workspace(ws, name, folder)
    ws.registry().upsert(
        "models", {"name": name}, source=record.source, meta=record.model_dump(exclude={"name"})
    )
    step(f"registered {name}")
    return PullResult(model=get_model(ws, name), already_present=False, steps=steps)
