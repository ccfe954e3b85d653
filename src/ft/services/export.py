"""`ft export`: a tuned model as a file llama.cpp, Ollama, transformers, mlx-lm or PEFT loads.

Steps, each of which can stop the export with a message saying what went wrong:

1. Find the checkpoint (:func:`ft.services.checkpoints.resolve_checkpoint`, shared with `ft evaluate`)
   and its base model.
2. Load the base with float32 weights -- a quantized base is dequantized *before* merging, because
   adding a small LoRA update to 4-bit weights and re-quantizing rounds most of it away.
3. Apply the adapters, then fuse them (W + (alpha/r)·BA, or DoRA's normalised form) and check the
   fused model computes what the adapter-on-base model computes.
4. Write the requested format into a temporary folder beside the destination.
5. Verify: read the files back, compare every tensor's name and shape, and compare logits on a few
   prompts against the adapter-on-base model; for quantized outputs also check the tune survived.
   A failing check removes the temporary folder (nothing partial is left) and says what differed.
6. Rename into place (``runs/<id>/export/<format>-<quant>/`` by default), record sha256s in
   ``ft_export.json`` and in the workspace registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ft import __version__
from ft.data.templates import stop_markers
from ft.engine.lora import fuse
from ft.errors import ErrorCode, FtError
from ft.models.export import DEFAULT_QUANT, FORMATS, QUANTS
from ft.models.export.checks import Check, Checks, Job, Progress, check_early, fail, flat
from ft.models.export.gguf import export_gguf
from ft.models.export.hf_folder import export_hf
from ft.models.export.mlx_folder import export_mlx
from ft.models.export.peft_export import base_weight, export_peft
from ft.services.checkpoints import ResolvedCheckpoint, apply_checkpoint, base_model_of, resolve_checkpoint
from ft.services.export_template import check_chat_template, run_imatrix, tuned_template
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir, sha256_file
from ft.workspace.run_folder import EXPORT_DIR

log = logging.getLogger(__name__)

TABLE = "exports"
EXPORT_MANIFEST = "ft_export.json"


# ------------------------------------------------------------------------------------ results
class ExportResult(BaseModel):
    """What `ft export` produced."""

    id: str
    format: str
    quant: str
    path: str = Field(description="folder holding the exported files")
    main_file: str | None = Field(
        default=None, description="the file to point a tool at (the .gguf for gguf)"
    )
    run_id: str | None
    checkpoint: str | None
    base_model: str
    base_quantized: bool
    method: str | None
    files: dict[str, str] = Field(description="file name -> sha256")
    bytes: int
    checks: list[Check]
    seconds: float
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per step")
    tune_kept: float | None = Field(
        default=None, description="share of the tune's effect on the logits the file keeps"
    )
    drift_allowed: bool = Field(
        default=False, description="written with --allow-drift although the tune-survival check failed"
    )
    reused: bool = Field(default=False, description="an earlier export at this destination, not made again")
    pushed: dict[str, Any] | None = Field(default=None, description="where --push uploaded it")
    commands: dict[str, str] = Field(default_factory=dict, description="how to use it")


@dataclass
class _Source:
    """What is exported: a run's checkpoint, or a pulled base model."""

    ckpt: ResolvedCheckpoint | None
    base_dir: Path
    base_name: str
    source: str  # run-checkpoint or model name: names the default folder and the export id
    trusted: bool = False


def _source(ws: Workspace, run: str | None, checkpoint: str, model: str | None) -> _Source:
    if model is None:
        ckpt = resolve_checkpoint(ws, run, checkpoint)
        return _Source(
            ckpt, Path(ckpt.base_model_dir), ckpt.base_model, f"{ckpt.run_id or 'checkpoint'}-{ckpt.name}"
        )
    base_dir = ws.model_dir(model)
    if not (base_dir / "config.json").is_file():
        raise FtError(
            ErrorCode.NOT_FOUND, f"no model {model!r} in {ws.models_dir}", f"pull it: ft models pull {model}"
        )
    return _Source(None, base_dir, model, model, trusted=base_model_of(ws, model)[2])


def _check_options(fmt: str, quant: str | None, model: str | None) -> str:
    if fmt not in FORMATS:
        raise FtError(ErrorCode.USAGE, f"unknown --format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    quant = quant or DEFAULT_QUANT[fmt]
    if quant not in QUANTS:
        raise FtError(ErrorCode.USAGE, f"unknown --quant {quant!r}", f"use one of {', '.join(QUANTS)}")
    if fmt == "peft" and model is not None:
        raise FtError(
            ErrorCode.USAGE,
            "--format peft exports adapters; a base model has none",
            "pass a run (and --checkpoint) instead of --model",
        )
    return quant


@dataclass
class _Fused:
    """The model to write (adapters fused into float weights) and the logits the file is checked against."""

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    quantized: bool
    ids: list[list[int]]
    base_logits: list[Any]
    reference: list[Any]
    method: str | None = None
    adapters: list[Any] | None = None
    base_linears: dict[str, Any] | None = None


def _fused(src: _Source, fmt: str, checks: Checks, say: Progress) -> _Fused:
    """The base in float32 with the checkpoint's adapters fused in, checked against adapter-on-base."""
    import mlx.core as mx

    from ft.models.export import verify
    from ft.models.loading import load_for

    say(f"loading {src.base_name} with float32 weights")
    ckpt = src.ckpt
    loaded = (
        ckpt.load_base("export") if ckpt else load_for(src.base_dir, "export", trust_remote_code=src.trusted)
    )
    mdl = loaded.model
    config = {k: v for k, v in loaded.config.items() if k not in ("quantization", "quantization_config")}
    ids = verify.prompt_ids(loaded.tokenizer, chat="Write one sentence about the sea.")
    base_logits = verify.logits(mdl, ids)
    out = _Fused(mdl, loaded.tokenizer, config, loaded.quantized, ids, base_logits, base_logits)
    if ckpt is None:
        return out
    say(f"applying adapters from {ckpt.name}")
    out.method = apply_checkpoint(mdl, ckpt, as_trained=False)  # QLoRA's adapters go onto the float base
    if out.method == "full":
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            "exporting full fine-tuning checkpoints is not supported yet",
            "export a LoRA/DoRA run",
        )
    if ckpt.note:
        checks.append(Check(name="checkpoint", ok=True, detail=ckpt.note))
    out.reference = verify.logits(mdl, ids)
    moved = verify.distance(out.reference, base_logits)
    checks.append(
        Check(name="adapters", ok=True, detail=f"{out.method} adapters move the logits by RMS {moved:.4g}")
    )
    if moved == 0.0:
        log.warning("the adapters of %s do not change the model (all-zero update?)", ckpt.name)
    if fmt == "peft":
        from ft.models.export.peft import collect_adapters

        out.adapters = collect_adapters(mdl)
        out.base_linears = {a.module: base_weight(mdl, a.module) for a in out.adapters}
    n = fuse(mdl, dequantize=True)
    mx.eval(mdl.parameters())
    d = verify.diff(verify.logits(mdl, ids), out.reference)
    ok = d.rel < 1e-4 and d.top1 == 1.0
    checks.append(
        Check(name="fuse", ok=ok, detail=f"{n} modules fused; fused vs adapter-on-base: {d.describe()}")
    )
    if not ok:
        raise fail("fused model differs from the adapter-on-base model", d.describe())
    return out


def _write(
    ws: Workspace,
    tmp: Path,
    fmt: str,
    quant: str,
    src: _Source,
    f: _Fused,
    checks: Checks,
    say: Progress,
    imatrix: Any = None,
) -> str | None:
    """Write ``fmt`` into ``tmp`` and verify it (models.export's per-format writers); returns the main file."""
    ckpt, base_dir = src.ckpt, src.base_dir
    job = Job(
        tmp=tmp,
        model=f.model,
        tensors=flat(f.model.parameters()),
        config=f.config,
        base_dir=base_dir,
        quant=quant,
        tokenizer=f.tokenizer,
        ids=f.ids,
        reference=f.reference,
        base=f.base_logits,
        checks=checks,
        say=say,
        ckpt=ckpt,
    )
    if fmt == "gguf":
        return export_gguf(
            job,
            name=f"{src.base_name} {src.source}",
            chat_template=tuned_template(ws, ckpt, base_dir),
            chat_check=lambda llm, template, c: check_chat_template(llm, base_dir, template, c),
            stop=stop_markers(f.tokenizer, model_name=src.base_name).names,
            imatrix=imatrix,
        )
    if fmt == "mlx":
        export_mlx(job)
    elif fmt == "hf":
        export_hf(job)
    else:
        assert f.adapters is not None and f.base_linears is not None
        export_peft(job, f.adapters, f.base_linears)
    return None


def _manifest(
    fmt: str, quant: str, src: _Source, f: _Fused, files: dict[str, str], checks: Checks
) -> dict[str, Any]:
    ckpt = src.ckpt
    return {
        "ft_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "format": fmt,
        "quant": quant,
        "run_id": ckpt.run_id if ckpt else None,
        "checkpoint": ckpt.name if ckpt else None,
        "checkpoint_path": ckpt.path if ckpt else None,
        "base_model": src.base_name,
        "base_quantized": f.quantized,
        "method": f.method,
        "files": files,
        "checks": [c.model_dump() for c in checks],
        "tune_kept": checks.tune_kept,
        "allow_drift": checks.allow_drift,
    }


def export(
    ws: Workspace,
    *,
    run: str | None = None,
    checkpoint: str = "best",
    model: str | None = None,
    fmt: str = "gguf",
    quant: str | None = None,
    out: Path | None = None,
    force: bool = False,
    allow_drift: bool = False,
    imatrix: bool = False,
    reuse_existing: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a run's checkpoint (or, with ``model``, a pulled base model) as ``fmt`` at ``quant``:
    source -> fuse -> write and verify (``ft.models.export``) -> rename into place -> record."""
    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    quant = _check_options(fmt, quant, model)
    src = _source(ws, run, checkpoint, model)
    ckpt = src.ckpt
    check_early(fmt, quant, src.base_dir)
    if imatrix and (fmt != "gguf" or quant in ("f32", "f16", "bf16")):
        raise FtError(
            ErrorCode.USAGE,
            "--imatrix guides llama.cpp's quantizer: it applies to --format gguf at a quantized type",
            "add --quant q4_k_m (or another quantized type), or drop --imatrix",
        )
    if imatrix and (ckpt is None or not ckpt.run_id):
        raise FtError(
            ErrorCode.USAGE,
            "--imatrix measures activations on the run's training data; a base model has none",
            "export a run, or drop --imatrix",
        )
    t_load = time.perf_counter()
    label = f"{fmt}-{quant}"
    if out is None:
        out = (
            (ws.run_dir(ckpt.run_id) / EXPORT_DIR / label)
            if ckpt and ckpt.run_id
            else (ws.root / "exports" / f"{src.source}-{label}")
        )
    out = Path(out).expanduser().resolve()
    if out.exists() and not force and reuse_existing and (out / EXPORT_MANIFEST).is_file():
        return existing_export(out)
    if out.exists() and not force:
        raise FtError(
            ErrorCode.ALREADY_EXISTS,
            f"{out} already exists",
            "pass --force to replace it, or --out to write elsewhere",
        )
    checks = Checks(allow_drift)
    f = _fused(src, fmt, checks, say)
    im = None
    if imatrix:
        im = run_imatrix(ws, ckpt, f.model, f.config, say)
        checks.append(
            Check(
                name="imatrix",
                ok=True,
                detail=f"importance matrix of {len(im.values)} weights from {im.tokens:,} tokens of the run's training data",
            )
        )
    checks.timed("load and fuse", t_load)
    say(f"writing {fmt} ({quant}) to {out}")
    try:
        with atomic_dir(out, overwrite=force) as tmp:
            tmp.chmod(
                0o777 & ~_umask()
            )  # mkdtemp makes it private; an export is for other tools (Ollama) too
            main_file = _write(ws, tmp, fmt, quant, src, f, checks, say, im)
            files = {
                p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            manifest = _manifest(fmt, quant, src, f, files, checks)
            (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except FileExistsError as e:
        raise FtError(ErrorCode.ALREADY_EXISTS, f"{out} already exists", "pass --force to replace it") from e
    except OSError as e:
        raise FtError(
            ErrorCode.EXPORT_FAILED, f"could not write {out}: {e}", "check free disk space and permissions"
        ) from e
    result = ExportResult(
        id=f"{src.source}-{label}-{hashlib.sha256(str(out).encode()).hexdigest()[:6]}",
        format=fmt,
        quant=quant,
        path=str(out),
        main_file=str(out / main_file) if main_file else None,
        run_id=ckpt.run_id if ckpt else None,
        checkpoint=ckpt.name if ckpt else None,
        base_model=src.base_name,
        base_quantized=f.quantized,
        method=f.method,
        files=files,
        bytes=size,
        checks=list(checks),
        seconds=round(time.perf_counter() - t0, 2),
        commands=_commands(out, main_file, fmt),
        timings=checks.timings,
        tune_kept=checks.tune_kept,
        drift_allowed=any(c.name == "tune kept" and not c.ok for c in checks),
    )
    meta = {
        k: getattr(result, k)
        for k in ("format", "quant", "path", "checkpoint", "base_model", "bytes", "method")
    }
    ws.registry().upsert(TABLE, {"id": result.id}, run_id=result.run_id, meta={**meta, "sha256": files})
    return result


def existing_export(out: Path) -> ExportResult:
    """The result of an earlier export in ``out``, from its manifest (for `--push` of a finished export)."""
    m = json.loads((out / EXPORT_MANIFEST).read_text())
    files = m.get("files") or {}
    main = next((n for n in files if n.endswith(".gguf")), None) if m.get("format") == "gguf" else None
    checks = [Check(**c) for c in m.get("checks") or []]
    return ExportResult(
        id=f"{out.name}-existing",
        format=m["format"],
        quant=m["quant"],
        path=str(out),
        main_file=str(out / main) if main else None,
        run_id=m.get("run_id"),
        checkpoint=m.get("checkpoint"),
        base_model=m.get("base_model", ""),
        base_quantized=bool(m.get("base_quantized")),
        method=m.get("method"),
        files=files,
        bytes=sum((out / n).stat().st_size for n in files if (out / n).is_file()),
        checks=checks,
        seconds=0.0,
        commands=_commands(out, main and Path(main).name, m["format"]),
        tune_kept=m.get("tune_kept"),
        drift_allowed=any(c.name == "tune kept" and not c.ok for c in checks),
        reused=True,
    )


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _commands(out: Path, main_file: str | None, fmt: str) -> dict[str, str]:
    if fmt == "gguf" and main_file:
        return {
            "llama.cpp": f"llama-cli -m {out / main_file} -cnv",
            "llama.cpp server": f"llama-server -m {out / main_file} --port 8080",
            "ollama": f"cd {out} && ollama create my-model -f Modelfile && ollama run my-model",
        }
    if fmt == "mlx":
        return {"mlx-lm": f"mlx_lm.generate --model {out} --prompt 'Hello'", "ft": f"ft serve --model {out}"}
    if fmt == "hf":
        return {"transformers": f"AutoModelForCausalLM.from_pretrained('{out}')"}
    return {"peft": f"PeftModel.from_pretrained(base_model, '{out}')"}


def list_exports(ws: Workspace, run: str | None = None) -> list[dict[str, Any]]:
    """Registry rows of past exports (optionally of one run)."""
    if run is not None:
        validate_name(run, "run id")
        return ws.registry().list(TABLE, run_id=run)
    return ws.registry().list(TABLE)


__all__ = [
    "Check",
    "ExportResult",
    "ResolvedCheckpoint",
    "apply_checkpoint",
    "export",
    "list_exports",
    "resolve_checkpoint",
]
