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
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ft import __version__
from ft.engine.lora import fuse
from ft.errors import ErrorCode, FtError
from ft.models.export import DEFAULT_QUANT, FORMATS, GGUF_ONLY_QUANTS, PRECISION_ORDER, QUANTS
from ft.services.checkpoints import ResolvedCheckpoint, apply_checkpoint, base_model_of, resolve_checkpoint
from ft.services.export_template import tuned_template
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir, sha256_file
from ft.workspace.run_folder import EXPORT_DIR

log = logging.getLogger(__name__)

TABLE = "exports"
MANIFEST = "ft_export.json"

# Verification limits per precision, measured on SmolLM2-135M (base, and a deliberately strong tune):
# * per tensor, relative RMS error of the file's weights vs the fused float32 weights: f16 ~2e-4,
#   bf16 ~2e-3, q8_0 ~5e-3..1e-2, q4_0 ~0.09 -- a swapped, mis-named or mis-permuted tensor is ~1.4;
# * logits on the verification prompts (relative error, top-1 agreement): f16 0.001-0.008 / 100%,
#   bf16 0.004-0.055 / 98-100%, q8_0 0.03-0.19 / 95-98%, q4_0 ~0.45 / ~57% (4-bit hurts a 135M model).
TENSOR_TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "bf16": 6e-3, "q8_0": 3e-2, "q4_0": 0.25}
TOLERANCE: dict[str, tuple[float, float]] = {
    "f32": (1e-4, 0.999),
    "f16": (3e-2, 0.97),
    "bf16": (0.12, 0.90),
    "q8_0": (0.3, 0.85),
    "q6_k": (0.3, 0.85),
    "q5_k_m": (0.5, 0.65),
    "q4_k_m": (0.5, 0.65),
    "q4_0": (0.7, 0.45),
}
# llama.cpp computes in its own order (and f16 KV cache): its logits on the f32/f16 file sit a little
# further from MLX's than MLX's own on the same weights.
LLAMA_CPP_TOLERANCE: dict[str, tuple[float, float]] = {**TOLERANCE, "f32": (1e-2, 0.97)}
# mlx and hf folders are checked as a user runs them: computing in the stored precision (fp16 math adds
# error on top of fp16 weights; measured on the tuned SmolLM2: f16 0.036 / 98.8%).
RUNTIME_TOLERANCE: dict[str, tuple[float, float]] = {**TOLERANCE, "f16": (0.08, 0.95), "bf16": (0.25, 0.88)}
# The export must keep at least this share of the tune's effect on the logits (see verify.tune_kept);
# measured (MLX reading the file back): f16 99%, bf16 95%; (llama.cpp running llama.cpp's quantized file,
# tuned SmolLM2-135M): q8_0 87%, q6_k 90%, q4_k_m 84%, q4_0 57%. Logits in llama.cpp, same model
# (relative error / top-1): f16 0.018 / 98.8%, q8_0 0.14 / 90%, q6_k 0.11 / 94%, q5_k_m 0.29 / 72%,
# q4_k_m 0.17 / 87%, q4_0 0.45 / 57%. (SmolLM2's rows of 576 are not a multiple of the k-quants'
# 256-value super-blocks, so llama.cpp falls back to q5_0/q8_0 for most of its tensors.)
MIN_TUNE_KEPT = {
    "f32": 0.99,
    "f16": 0.9,
    "bf16": 0.8,
    "q8_0": 0.6,
    "q6_k": 0.6,
    "q5_k_m": 0.5,
    "q4_k_m": 0.5,
    "q4_0": 0.3,
}

Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------ results
class Check(BaseModel):
    name: str
    ok: bool
    detail: str
    value: float | None = None


class Checks(list[Check]):
    """The checks of one export, plus what the steps share: --allow-drift and the time each step took."""

    def __init__(self, allow_drift: bool = False) -> None:
        super().__init__()
        self.allow_drift = allow_drift
        self.timings: dict[str, float] = {}

    def timed(self, step: str, t0: float) -> None:
        self.timings[step] = round(self.timings.get(step, 0.0) + time.perf_counter() - t0, 3)

    @property
    def tune_kept(self) -> float | None:
        kept = [c.value for c in self if c.name == "tune kept"]
        return kept[-1] if kept else None


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


def _flat(tree: Any) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(tree))


# ------------------------------------------------------------------------------------ export
def _fail(what: str, detail: str, hint: str | None = None) -> FtError:
    return FtError(
        ErrorCode.EXPORT_FAILED, f"export check failed: {what}: {detail}; nothing was written", hint
    )


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
    """Export a run's checkpoint (or, with ``model``, a pulled base model) as ``fmt`` at ``quant``."""
    import mlx.core as mx

    from ft.models.export import verify
    from ft.models.loading import load_for

    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
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

    ckpt: ResolvedCheckpoint | None = None
    if model is not None:
        base_dir = ws.model_dir(model)
        if not (base_dir / "config.json").is_file():
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"no model {model!r} in {ws.models_dir}",
                f"pull it: ft models pull {model}",
            )
        base_name, source = model, model
        trusted = base_model_of(ws, model)[2]
    else:
        ckpt = resolve_checkpoint(ws, run, checkpoint)
        base_dir, base_name = Path(ckpt.base_model_dir), ckpt.base_model
        source = f"{ckpt.run_id or 'checkpoint'}-{ckpt.name}"
    _check_early(fmt, quant, base_dir)
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
            else (ws.root / "exports" / f"{source}-{label}")
        )
    out = Path(out).expanduser().resolve()
    if out.exists() and not force and reuse_existing and (out / MANIFEST).is_file():
        return existing_export(out)
    if out.exists() and not force:
        raise FtError(
            ErrorCode.ALREADY_EXISTS,
            f"{out} already exists",
            "pass --force to replace it, or --out to write elsewhere",
        )

    say(f"loading {base_name} with float32 weights")
    loaded = (
        ckpt.load_base("export")
        if ckpt is not None
        else load_for(base_dir, "export", trust_remote_code=trusted)
    )
    mdl, tok, config = loaded.model, loaded.tokenizer, dict(loaded.config)
    checks = Checks(allow_drift)
    ids = verify.prompt_ids(tok, chat="Write one sentence about the sea.")
    base_logits = verify.logits(mdl, ids)
    method: str | None = None
    adapters = None
    tuned_logits = base_logits
    if ckpt is not None:
        say(f"applying adapters from {ckpt.name}")
        method = apply_checkpoint(mdl, ckpt, as_trained=False)  # QLoRA's adapters go onto the float base
        if method == "full":
            raise FtError(
                ErrorCode.MODEL_UNSUPPORTED,
                "exporting full fine-tuning checkpoints is not supported yet",
                "export a LoRA/DoRA run",
            )
        if ckpt.note:
            checks.append(Check(name="checkpoint", ok=True, detail=ckpt.note))
        tuned_logits = verify.logits(mdl, ids)
        moved = verify.distance(tuned_logits, base_logits)
        checks.append(
            Check(name="adapters", ok=True, detail=f"{method} adapters move the logits by RMS {moved:.4g}")
        )
        if moved == 0.0:
            log.warning("the adapters of %s do not change the model (all-zero update?)", ckpt.name)
        if fmt == "peft":
            from ft.models.export.peft import collect_adapters

            adapters = collect_adapters(mdl)
            base_linears = {a.module: _base_weight(mdl, a.module) for a in adapters}
        n = fuse(mdl, dequantize=True)
        mx.eval(mdl.parameters())
        fused_logits = verify.logits(mdl, ids)
        d = verify.diff(fused_logits, tuned_logits)
        ok = d.rel < 1e-4 and d.top1 == 1.0
        checks.append(
            Check(name="fuse", ok=ok, detail=f"{n} modules fused; fused vs adapter-on-base: {d.describe()}")
        )
        if not ok:
            raise _fail("fused model differs from the adapter-on-base model", d.describe())
    reference = tuned_logits

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    tensors = _flat(mdl.parameters())
    im = None
    if imatrix:
        im = _run_imatrix(ws, ckpt, mdl, config, say)
        checks.append(
            Check(
                name="imatrix",
                ok=True,
                detail=f"importance matrix of {len(im.values)} weights from {im.tokens:,} tokens of the run's training data",
            )
        )
    checks.timed("load and fuse", t_load)
    say(f"writing {fmt} ({quant}) to {out}")
    main_file: str | None = None
    try:
        with atomic_dir(out, overwrite=force) as tmp:
            tmp.chmod(
                0o777 & ~_umask()
            )  # mkdtemp makes it private; an export is for other tools (an Ollama daemon) too
            if fmt == "gguf":
                main_file = _export_gguf(
                    tmp,
                    mdl,
                    tensors,
                    config,
                    base_dir,
                    quant,
                    ids,
                    reference,
                    base_logits,
                    checks,
                    name=f"{base_name} {source}",
                    ckpt=ckpt,
                    say=say,
                    chat_template=tuned_template(ws, ckpt, base_dir),
                    imatrix=im,
                )
            elif fmt == "mlx":
                _export_mlx(tmp, mdl, config, base_dir, quant, ids, reference, base_logits, checks, ckpt, say)
            elif fmt == "hf":
                _export_hf(
                    tmp, tensors, config, base_dir, quant, tok, ids, reference, base_logits, checks, ckpt, say
                )
            else:
                assert adapters is not None and ckpt is not None
                _export_peft(tmp, adapters, base_linears, tensors, ckpt, config, quant, checks, say)
            files = {
                p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            manifest = {
                "ft_version": __version__,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "format": fmt,
                "quant": quant,
                "run_id": ckpt.run_id if ckpt else None,
                "checkpoint": ckpt.name if ckpt else None,
                "checkpoint_path": ckpt.path if ckpt else None,
                "base_model": base_name,
                "base_quantized": loaded.quantized,
                "method": method,
                "files": files,
                "checks": [c.model_dump() for c in checks],
                "tune_kept": checks.tune_kept,
                "allow_drift": allow_drift,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except FileExistsError as e:
        raise FtError(ErrorCode.ALREADY_EXISTS, f"{out} already exists", "pass --force to replace it") from e
    except OSError as e:
        raise FtError(
            ErrorCode.EXPORT_FAILED, f"could not write {out}: {e}", "check free disk space and permissions"
        ) from e

    export_id = f"{source}-{label}-{hashlib.sha256(str(out).encode()).hexdigest()[:6]}"
    commands = _commands(out, main_file, fmt)
    result = ExportResult(
        id=export_id,
        format=fmt,
        quant=quant,
        path=str(out),
        main_file=str(out / main_file) if main_file else None,
        run_id=ckpt.run_id if ckpt else None,
        checkpoint=ckpt.name if ckpt else None,
        base_model=base_name,
        base_quantized=loaded.quantized,
        method=method,
        files=files,
        bytes=size,
        checks=list(checks),
        seconds=round(time.perf_counter() - t0, 2),
        commands=commands,
        timings=checks.timings,
        tune_kept=checks.tune_kept,
        drift_allowed=any(c.name == "tune kept" and not c.ok for c in checks),
    )
    ws.registry().upsert(
        TABLE,
        {"id": export_id},
        run_id=result.run_id,
        meta={
            "format": fmt,
            "quant": quant,
            "path": str(out),
            "checkpoint": result.checkpoint,
            "base_model": base_name,
            "sha256": files,
            "bytes": size,
            "method": method,
        },
    )
    return result


def existing_export(out: Path) -> ExportResult:
    """The result of an earlier export in ``out``, from its manifest (for `--push` of a finished export)."""
    m = json.loads((out / MANIFEST).read_text())
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


def _check_early(fmt: str, quant: str, base_dir: Path) -> None:
    """Refuse what cannot work before spending time loading and fusing the model."""
    from ft.models.export.folders import HF_ARCHITECTURES
    from ft.models.export.gguf_file import check_architecture

    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FtError(ErrorCode.MODEL_INVALID, f"{base_dir / 'config.json'}: {e}") from e
    if quant in GGUF_ONLY_QUANTS and fmt != "gguf":
        raise FtError(
            ErrorCode.USAGE,
            f"--quant {quant} is one of llama.cpp's k-quants, which exist only as GGUF",
            "use --format gguf, or --quant q8_0 / q4_0 for an MLX-quantized folder",
        )
    if fmt == "gguf":
        check_architecture(config)
        if quant not in ("f32", "f16", "bf16"):
            from ft.models.export import llamacpp

            llamacpp.require()
    elif fmt == "hf":
        if quant not in ("f32", "f16", "bf16"):
            raise FtError(
                ErrorCode.USAGE,
                f"--quant {quant} is not available for --format hf (transformers reads float safetensors)",
                "use --quant f16, bf16 or f32",
            )
        if config.get("model_type") not in HF_ARCHITECTURES:
            raise FtError(
                ErrorCode.MODEL_UNSUPPORTED,
                f"Hugging Face export supports {', '.join(sorted(HF_ARCHITECTURES))}; this model is {config.get('model_type')!r}",
                "export it with --format mlx or --format peft instead",
            )
    elif fmt == "peft" and quant not in ("f32", "f16"):
        raise FtError(
            ErrorCode.USAGE, f"--quant {quant} is not available for --format peft", "use f32 (default) or f16"
        )


def _base_weight(model: Any, module: str) -> Any:
    m = model
    for part in module.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m.linear.weight


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


def higher_precisions(quant: str) -> list[str]:
    """What to try when ``quant`` loses the tune: the next more precise types (bf16 only after bf16's peers)."""
    above = list(PRECISION_ORDER[PRECISION_ORDER.index(quant) + 1 :])
    if quant != "bf16" and "bf16" in above and len(above) > 2:
        above.remove("bf16")  # bf16 keeps fewer mantissa bits than f16: no better for a small tune
    return above[:2]


def drift_hint(quant: str) -> str:
    more = higher_precisions(quant)
    tries = f"export at a higher precision (--quant {' or '.join(more)})" if more else "train longer"
    return (
        f"{tries}, or pass --allow-drift to write the {quant} file anyway "
        "(the measured share is then shown in the summary and recorded in ft_export.json)"
    )


def _check_logits(
    what: str,
    got: list[Any],
    reference: list[Any],
    base: list[Any],
    quant: str,
    checks: list[Check],
    tuned: bool,
    limits: dict[str, tuple[float, float]] | None = None,
    name: str = "logits",
) -> None:
    from ft.models.export import verify

    max_rel, min_top1 = (limits or TOLERANCE)[quant]
    d = verify.diff(got, reference)
    ok = d.rel <= max_rel and d.top1 >= min_top1
    checks.append(
        Check(
            name=name,
            ok=ok,
            detail=f"{what} vs the MLX model on {len(reference)} prompts: {d.describe()}",
            value=d.top1,
        )
    )
    if not ok:
        raise _fail(
            f"{what} logits differ from the MLX model",
            f"{d.describe()} (allowed at {quant}: relative <= {max_rel}, top-1 >= {min_top1:.0%})",
        )
    if tuned and verify.distance(reference, base) > 0:
        kept = verify.tune_kept(got, reference, base)
        need = MIN_TUNE_KEPT[quant]
        ok = kept >= need
        drift = not ok and getattr(checks, "allow_drift", False)
        checks.append(
            Check(
                name="tune kept",
                ok=ok,
                detail=f"the export keeps {kept:.1%} of the tune's effect on the logits"
                + (
                    f" (below the {need:.0%} required at {quant}; written with --allow-drift)"
                    if drift
                    else ""
                ),
                value=round(kept, 4),
            )
        )
        if not ok and not drift:
            raise _fail(
                f"the tune does not survive {quant}",
                f"only {kept:.1%} of its effect on the logits is left (need {need:.0%})",
                drift_hint(quant),
            )


def _export_gguf(
    tmp: Path,
    mdl: Any,
    tensors: dict[str, Any],
    config: dict[str, Any],
    base_dir: Path,
    quant: str,
    ids: list[list[int]],
    reference: list[Any],
    base: list[Any],
    checks: list[Check],
    *,
    name: str,
    ckpt: ResolvedCheckpoint | None,
    say: Progress,
    chat_template: str | None = None,
    imatrix: Any = None,
) -> str:
    import numpy as np

    from ft.models.export import llamacpp, verify
    from ft.models.export.gguf_file import read_gguf, write_gguf
    from ft.models.export.gguf_vocab import chat_template as folder_template
    from ft.models.export.gguf_vocab import read_vocab
    from ft.models.export.modelfile import modelfile

    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
    fname = f"{slug}-{quant}.gguf"
    # Quantized files are made by llama.cpp's quantizer from an f16 file verified first.
    float_quant = quant if quant in ("f32", "f16", "bf16") else "f16"
    float_name = fname if float_quant == quant else f".{slug}-f16.gguf"
    t = time.perf_counter()
    shown = [0.0]

    def tensor_progress(i: int, n: int) -> None:
        if time.perf_counter() - shown[0] > 0.5 or i == n:
            shown[0] = time.perf_counter()
            say(f"writing GGUF ({float_quant}): tensor {i}/{n}")

    written = write_gguf(
        tmp / float_name,
        tensors,
        config,
        base_dir,
        float_quant,
        name=name,
        # No local path in the file: it may be pushed to the Hub.
        description=f"exported by ft {__version__}" + (f" from {ckpt.run_id} {ckpt.name}" if ckpt else ""),
        chat_template=chat_template,
        progress=tensor_progress,
    )
    checks.timed("write", t)  # type: ignore[attr-defined]
    t = time.perf_counter()
    say(f"verifying the {float_quant} GGUF file")
    back = read_gguf(tmp / float_name, config)
    want = {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    got = {k: tuple(v.shape) for k, v in back.tensors.items()}
    problems = [f"{k} missing" for k in want if k not in got] + [
        f"{k} unexpected" for k in got if k not in want
    ]
    problems += [f"{k}: {got[k]} vs {want[k]}" for k in want if k in got and got[k] != want[k]]
    if problems:
        raise _fail("tensor names/shapes", "; ".join(problems[:8]))
    worst_name, worst = "", 0.0
    for k, v in back.tensors.items():
        src = np.asarray(_np32(tensors[k]))
        err = float(np.sqrt(np.mean((v - src) ** 2) / (np.mean(src**2) or 1.0)))
        limit = TENSOR_TOLERANCE["f32" if v.ndim == 1 else back.tensor_types[k].lower()]
        if err > limit:
            raise _fail(
                "tensor values",
                f"{k} ({back.tensor_types[k]}) is off by relative RMS {err:.3g} (allowed {limit:g})",
            )
        if err > worst:
            worst_name, worst = k, err
    checks.append(
        Check(
            name="tensors",
            ok=True,
            detail=f"{len(got)} tensors, names and shapes match "
            f"({written.tensor_types}); largest relative RMS error {worst:.2g} ({worst_name})",
        )
    )
    vocab = read_vocab(base_dir, int(tensors["model.embed_tokens.weight"].shape[0]))
    meta = back.metadata
    tok_problems = []
    if list(meta.get("tokenizer.ggml.tokens") or []) != vocab.tokens:
        tok_problems.append("token list")
    if list(meta.get("tokenizer.ggml.token_type") or []) != vocab.token_types:
        tok_problems.append("token types")
    template = chat_template or folder_template(base_dir)
    if template and meta.get("tokenizer.chat_template") != template:
        tok_problems.append("chat template")
    if tok_problems:
        raise _fail("tokenizer metadata", "differs from the model's tokenizer in: " + ", ".join(tok_problems))
    notes = "; ".join(written.notes)
    checks.append(
        Check(
            name="tokenizer",
            ok=True,
            detail=f"{len(vocab.tokens)} tokens ({written.tokenizer_model}, "
            f"pre-tokenizer {written.pre_tokenizer}), special tokens and chat template written"
            + (f"; {notes}" if notes else ""),
        )
    )
    mdl.load_weights([(k, _mx(np.asarray(v))) for k, v in back.tensors.items()], strict=False)
    got_logits = verify.logits(mdl, ids)
    _check_logits(
        f"GGUF ({float_quant}) read back",
        got_logits,
        reference,
        base,
        float_quant,
        checks,
        tuned=ckpt is not None and float_quant == quant,
    )
    checks.timed("verify", t)  # type: ignore[attr-defined]
    if float_quant != quant:
        say(f"quantizing to {quant} with llama.cpp's quantizer")
        seconds = llamacpp.quantize(tmp / float_name, tmp / fname, quant, imatrix=imatrix)
        checks.timings["quantize"] = round(seconds, 3)  # type: ignore[attr-defined]
        _check_quantized_layout(tmp / float_name, tmp / fname, quant, checks)
        (tmp / float_name).unlink()
    if llamacpp.available():
        t = time.perf_counter()
        say(f"checking {fname} in llama.cpp")
        _check_in_llama_cpp(
            tmp / fname, tok_texts(base_dir), ids, reference, base, quant, checks, ckpt, base_dir, template
        )
        checks.timed("llama.cpp check", t)  # type: ignore[attr-defined]
    else:
        checks.append(
            Check(
                name="llama.cpp",
                ok=True,
                detail="not run: llama-cpp-python is not installed (pip install 'ft[gguf]')",
            )
        )

    eos = meta.get("tokenizer.ggml.eos_token_id")
    stop = []
    if eos is not None:
        stop.append(vocab.tokens[int(eos)])
    # The end-of-turn marker the template writes after a reply (what ft's own evaluation and serving
    # stop at), derived from the same template the GGUF carries.
    eot = _template_end_of_turn(template, base_dir)
    if eot and eot in vocab.tokens and eot not in stop:
        stop.append(eot)
    for marker in ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>"):
        if marker in vocab.tokens and marker not in stop and template and marker in template:
            stop.append(marker)
    (tmp / "Modelfile").write_text(
        modelfile(
            fname,
            template,
            stop,
            context_length=int(config.get("max_position_embeddings") or 4096),
            tool_fallback=chat_template is not None,
        )
    )
    return fname


def tok_texts(base_dir: Path) -> list[tuple[str, list[int]]]:
    """(text, Hugging Face token ids) pairs for the tokenizer check: the verification prompts, no BOS.

    (Chat prompts, with their special tokens, are compared by the chat template check.)"""
    from transformers import AutoTokenizer

    from ft.models.export import verify

    hf = AutoTokenizer.from_pretrained(str(base_dir))
    return [(p, list(hf.encode(p, add_special_tokens=False))) for p in verify.VERIFY_PROMPTS]


IMATRIX_RECORDS = 64
IMATRIX_MAX_TOKENS = 512


def _run_imatrix(
    ws: Workspace, ckpt: ResolvedCheckpoint | None, mdl: Any, config: dict[str, Any], say: Progress
) -> Any:
    """The importance matrix of the fused model on the first records of the run's training split."""
    from ft.data.store import load_split
    from ft.models.export.imatrix import compute_imatrix
    from ft.services.datasets import resolve_dataset
    from ft.services.run_record import RunSnapshot

    assert ckpt is not None and ckpt.run_id
    snap = RunSnapshot.find(ws.run_dir(ckpt.run_id) / "config.json")
    if snap is None or snap.dataset is None:
        raise FtError(
            ErrorCode.USAGE,
            f"run {ckpt.run_id} records no dataset, so --imatrix has no training data to measure",
            "drop --imatrix",
        )
    ds = resolve_dataset(ws, snap.dataset.name, snap.dataset.version)
    if "train" not in ds.splits:
        raise FtError(
            ErrorCode.DATA_INVALID, f"dataset {ds.name} v{ds.version} has no train split for --imatrix"
        )
    split = load_split(ds.splits["train"])
    seqs = [
        list(map(int, split.tokens(i)[:IMATRIX_MAX_TOKENS])) for i in range(min(len(split), IMATRIX_RECORDS))
    ]
    say(f"measuring an importance matrix on {len(seqs)} training records")
    return compute_imatrix(mdl, seqs, config)


def _template_end_of_turn(template: str | None, base_dir: Path) -> str:
    from ft.data.metrics import end_of_turn
    from ft.data.templates import make_template

    if not template:
        return ""
    try:
        from ft.services.datasets import load_tokenizer

        tok = load_tokenizer(base_dir, base_dir.name)
        return end_of_turn(make_template("model", template, tok.special, base_dir.name).render)
    except FtError:
        return ""


def _check_quantized_layout(float_file: Path, quant_file: Path, quant: str, checks: list[Check]) -> None:
    from collections import Counter

    from ft.models.gguf_import import read_gguf_header

    a, b = read_gguf_header(float_file), read_gguf_header(quant_file)
    want = {t.name: t.shape for t in a.tensors}
    got = {t.name: t.shape for t in b.tensors}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise _fail(f"llama.cpp's {quant} file has other tensors than the f16 it was made from", str(diff))
    types = Counter(t.type_name for t in b.tensors)
    checks.append(
        Check(
            name="quantize",
            ok=True,
            detail=f"llama.cpp's quantizer wrote {len(got)} tensors ({dict(sorted(types.items()))})",
        )
    )


def _check_in_llama_cpp(
    path: Path,
    texts: list[tuple[str, list[int]]],
    ids: list[list[int]],
    reference: list[Any],
    base: list[Any],
    quant: str,
    checks: list[Check],
    ckpt: ResolvedCheckpoint | None,
    base_dir: Path,
    template: str | None,
) -> None:
    """Load the file in llama.cpp: its tokenizer must give the model's ids, its logits the MLX model's,
    its chat formatter the prompt ft trains on."""
    from ft.models.export import llamacpp

    llm = llamacpp.load(path)
    try:
        for text, want in texts:
            got = llamacpp.tokenize(llm, text)
            if got != want:
                raise _fail("llama.cpp tokenizes differently", f"{text[:50]!r}: {got[:12]} vs {want[:12]}")
        _check_chat_template(llm, base_dir, template, checks)
        got_logits = llamacpp.logits(llm, ids)
    finally:
        llm.close() if hasattr(llm, "close") else None
    _check_logits(
        f"llama.cpp running {path.name}",
        got_logits,
        reference,
        base,
        quant,
        checks,
        tuned=ckpt is not None and quant not in ("f32", "f16", "bf16"),
        limits=LLAMA_CPP_TOLERANCE,
        name="llama.cpp",
    )


# Conversations rendered through both ft and llama.cpp: plain chat, a system prompt, several turns.
CHAT_PROBES: dict[str, list[dict[str, Any]]] = {
    "plain": [{"role": "user", "content": "Write one sentence about the sea."}],
    "system": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a small assistant."},
        {"role": "user", "content": "Name three colours."},
    ],
}


def chat_template_mismatches(
    llm: Any,
    base_dir: Path,
    template: str | None = None,
    probes: dict[str, list[dict[str, Any]]] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Render CHAT_PROBES through ft (the template and tokenizer training uses) and through
    llama-cpp-python (the GGUF's template, its Jinja formatter, its tokenizer); returns (matched, differing)
    conversation names -> where they first differ). A conversation the template refuses (e.g. no system
    role) is skipped."""
    from ft.data.templates import make_template
    from ft.data.validate import RecordError
    from ft.models.export import llamacpp
    from ft.services.datasets import load_tokenizer

    tok = load_tokenizer(base_dir, base_dir.name)
    # The template the GGUF carries: the model's own, or the one the run was tuned with (tool fallback).
    tmpl = make_template("model", template or tok.chat_template, tok.special, base_dir.name)
    same: list[str] = []
    differ: dict[str, str] = {}
    for name, convo in (probes or CHAT_PROBES).items():
        try:
            text = tmpl.render(convo, add_generation_prompt=True, tools=tools)
        except (RecordError, FtError):
            continue
        ours = tok.backend.encode(text, add_special_tokens=False).ids
        try:
            theirs = llamacpp.render_chat(llm, convo, **({"tools": tools} if tools is not None else {}))
        except ValueError:  # the template's raise_exception: it refuses this conversation in llama.cpp too
            continue
        if list(ours) == list(theirs):
            same.append(name)
            continue
        k = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            min(len(ours), len(theirs)),
        )
        differ[name] = (
            f"at token {k}: ft {tok.backend.id_to_token(ours[k]) if k < len(ours) else 'end'!r}, "
            f"llama.cpp {llamacpp.special_text(llm, theirs[k]) if k < len(theirs) else 'end'!r}"
        )
    return same, differ


def _check_chat_template(llm: Any, base_dir: Path, template: str | None, checks: list[Check]) -> None:
    if not llm.metadata.get("tokenizer.chat_template"):
        return
    same, differ = chat_template_mismatches(llm, base_dir, template)
    if differ:
        # Not a broken file: llama.cpp's tokenizer itself differs from the one ft trained with (e.g. a
        # SentencePiece space after special tokens). Written, but shown as failed in the summary.
        detail = "; ".join(f"{k} {v}" for k, v in differ.items())
        log.warning("llama.cpp's chat prompt differs from ft's: %s", detail)
        checks.append(
            Check(
                name="chat template",
                ok=False,
                detail=f"llama-cpp-python's chat prompt differs from the one ft trained on: {detail}",
            )
        )
        return
    checks.append(
        Check(
            name="chat template",
            ok=True,
            detail=f"llama-cpp-python renders the GGUF's template to ft's prompt tokens ({', '.join(same) or 'none'})",
        )
    )


def _np32(x: Any) -> Any:
    import mlx.core as mx
    import numpy as np

    return x if isinstance(x, np.ndarray) else np.array(x.astype(mx.float32))


def _mx(x: Any) -> Any:
    import mlx.core as mx

    return mx.array(x)


def _export_mlx(
    tmp: Path,
    mdl: Any,
    config: dict[str, Any],
    base_dir: Path,
    quant: str,
    ids: list[list[int]],
    reference: list[Any],
    base: list[Any],
    checks: list[Check],
    ckpt: ResolvedCheckpoint | None,
    say: Progress,
) -> None:
    from mlx_lm.utils import load as mlx_load

    from ft.models.export import verify
    from ft.models.export.folders import write_mlx_folder

    write_mlx_folder(tmp, mdl, config, base_dir, quant)
    say("verifying the mlx-lm folder")
    back, _tok = mlx_load(str(tmp))
    want = {k: tuple(v.shape) for k, v in _flat(mdl.parameters()).items()}
    got = {k: tuple(v.shape) for k, v in _flat(back.parameters()).items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:8]
        raise _fail("tensor names/shapes of the mlx folder", str(diff))
    checks.append(
        Check(name="tensors", ok=True, detail=f"mlx_lm.load reads {len(got)} tensors, names and shapes match")
    )
    _check_logits(
        "mlx-lm folder",
        verify.logits(back, ids),
        reference,
        base,
        quant,
        checks,
        tuned=ckpt is not None,
        limits=RUNTIME_TOLERANCE,
    )


def _export_hf(
    tmp: Path,
    tensors: dict[str, Any],
    config: dict[str, Any],
    base_dir: Path,
    quant: str,
    tok: Any,
    ids: list[list[int]],
    reference: list[Any],
    base: list[Any],
    checks: list[Check],
    ckpt: ResolvedCheckpoint | None,
    say: Progress,
) -> None:
    from mlx_lm.utils import load as mlx_load
    from safetensors import safe_open

    from ft.models.export import verify
    from ft.models.export.folders import HF_WEIGHTS, write_hf_folder

    write_hf_folder(tmp, tensors, config, base_dir, quant)
    say("verifying the Hugging Face folder")
    with safe_open(str(tmp / HF_WEIGHTS), framework="numpy") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
    want = {k for k in tensors if not k.endswith("rotary_emb.inv_freq")}
    if config.get("tie_word_embeddings"):
        want.discard("lm_head.weight")
    if keys != want or meta.get("format") != "pt":
        raise _fail(
            "safetensors keys", f"missing {sorted(want - keys)[:5]}, unexpected {sorted(keys - want)[:5]}"
        )
    try:
        from transformers import AutoConfig, AutoTokenizer

        hf_cfg = AutoConfig.from_pretrained(str(tmp))
        hf_tok = AutoTokenizer.from_pretrained(str(tmp))
    except Exception as e:  # transformers' own message is the useful part
        raise _fail("transformers cannot load the folder", f"{type(e).__name__}: {e}") from e
    if hf_cfg.num_hidden_layers != config["num_hidden_layers"]:
        raise _fail("config.json", "num_hidden_layers differs")
    for seq in ids[: len(verify.VERIFY_PROMPTS)]:
        text = tok.decode(seq)
        if list(hf_tok.encode(text, add_special_tokens=False)) != list(
            tok.encode(text, add_special_tokens=False)
        ):
            raise _fail("tokenizer", f"transformers' tokenizer splits {text[:40]!r} differently")
    checks.append(
        Check(
            name="transformers",
            ok=True,
            detail=f"AutoConfig ({hf_cfg.model_type}) and AutoTokenizer load; token ids match",
        )
    )
    back, _ = mlx_load(str(tmp))
    _check_logits(
        "Hugging Face folder",
        verify.logits(back, ids),
        reference,
        base,
        quant,
        checks,
        tuned=ckpt is not None,
        limits=RUNTIME_TOLERANCE,
    )


def _export_peft(
    tmp: Path,
    adapters: list[Any],
    base_linears: dict[str, Any],
    fused: dict[str, Any],
    ckpt: ResolvedCheckpoint,
    config: dict[str, Any],
    quant: str,
    checks: list[Check],
    say: Progress,
) -> None:
    import numpy as np

    from ft.models.export.peft import peft_config, read_peft, write_peft

    cfg = peft_config(
        adapters,
        base_model=ckpt.base_model,
        n_layers=int(config["num_hidden_layers"]),
        dropout=ckpt.spec().dropout,
    )
    write_peft(tmp, adapters, cfg, dtype="float16" if quant == "f16" else "float32")
    say("verifying the PEFT adapter")
    back, back_cfg = read_peft(tmp)
    by_module = {a.module: a for a in back}
    worst = 0.0
    for a in adapters:
        b = by_module.get(a.module)
        if b is None or b.lora_a.shape != a.lora_a.shape or b.lora_b.shape != a.lora_b.shape:
            raise _fail("PEFT tensors", f"{a.module} missing or reshaped")
        # PEFT's math on the file must give the fused weight: W + (lora_alpha / r) * B @ A (DoRA: normalised).
        w = np.array(base_linears[a.module].astype(_f32()))
        delta = (float(back_cfg["lora_alpha"]) / float(back_cfg["r"])) * (b.lora_b.T @ b.lora_a.T)
        merged = w + delta
        if b.magnitude is not None:
            merged = (b.magnitude / np.linalg.norm(merged, axis=1))[:, None] * merged
        target = np.array(fused[f"{a.module}.weight"].astype(_f32()))
        worst = max(worst, float(np.max(np.abs(merged - target))) / (float(np.max(np.abs(target))) or 1.0))
    if worst > (1e-4 if quant == "f32" else 2e-3):
        raise _fail(
            "PEFT adapter math",
            f"W + (lora_alpha/r)·B·A differs from the fused weights by {worst:.3g} (relative)",
        )
    checks.append(
        Check(
            name="peft",
            ok=True,
            detail=f"{len(back)} modules, PEFT key names; W + (lora_alpha/r)·B·A "
            f"reproduces the fused weights (max relative error {worst:.2g})",
        )
    )


def _f32() -> Any:
    import mlx.core as mx

    return mx.float32


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
