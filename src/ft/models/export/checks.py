"""What an export checks, and how close each precision must come (measured limits).

Every format's writer appends :class:`Check` rows to a :class:`Checks` list and raises through
:func:`fail` when a check fails (the export then leaves nothing behind).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from ft.errors import ErrorCode, FtError
from ft.models.export import GGUF_ONLY_QUANTS, PRECISION_ORDER

Progress = Callable[[str], None]


class Tuned(Protocol):
    """The checkpoint an export comes from (``ft.services.checkpoints.ResolvedCheckpoint``)."""

    run_id: str | None
    name: str
    base_model: str

    def spec(self) -> Any: ...


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
    # q5_k_m on SmolLM2 (rows of 576: llama.cpp falls back for most tensors) agrees on only ~70% of tokens
    # and more than quadruples held-out perplexity: refused there, as it should be.
    "q5_k_m": (0.3, 0.85),
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


def flat(tree: Any) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(tree))


# ------------------------------------------------------------------------------------ export


def fail(what: str, detail: str, hint: str | None = None) -> FtError:
    return FtError(
        ErrorCode.EXPORT_FAILED, f"export check failed: {what}: {detail}; nothing was written", hint
    )


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


def np32(x: Any) -> Any:
    import mlx.core as mx
    import numpy as np

    return x if isinstance(x, np.ndarray) else np.array(x.astype(mx.float32))


def to_mx(x: Any) -> Any:
    import mlx.core as mx

    return mx.array(x)


def f32() -> Any:
    import mlx.core as mx

    return mx.float32


@dataclass
class Job:
    """One export being written: the fused model, the folder its files go into, and what they are checked
    against. Every format's writer takes one (``ft.services.export`` builds it)."""

    tmp: Path  # the folder the files are written into (renamed into place once verified)
    model: Any  # the MLX model with the adapters fused in (float weights)
    tensors: dict[str, Any]  # its parameters by Hugging Face name, as fused
    config: dict[str, Any]  # its config.json, without quantization entries
    base_dir: Path  # the base model's folder: tokenizer files, chat template
    quant: str
    tokenizer: Any
    ids: list[list[int]]  # token ids of the verification prompts
    reference: list[Any]  # the adapter-on-base model's logits on them
    base: list[Any]  # the base model's logits on them
    checks: Checks
    say: Progress
    ckpt: Tuned | None = None  # None: a base model is exported

    def check_logits(
        self,
        what: str,
        got: list[Any],
        *,
        quant: str | None = None,
        tune: bool = True,
        limits: dict[str, tuple[float, float]] | None = None,
        name: str = "logits",
    ) -> None:
        """``got`` (logits of the written file on the verification prompts) against the reference, within
        ``limits`` at ``quant`` (default: the export's); with ``tune``, a tuned export must also keep enough
        of the tune's effect (:data:`MIN_TUNE_KEPT`)."""
        from ft.models.export import verify

        quant = quant or self.quant
        max_rel, min_top1 = (limits or TOLERANCE)[quant]
        d = verify.diff(got, self.reference)
        ok = d.rel <= max_rel and d.top1 >= min_top1
        self.checks.append(
            Check(
                name=name,
                ok=ok,
                detail=f"{what} vs the MLX model on {len(self.reference)} prompts: {d.describe()}",
                value=d.top1,
            )
        )
        if not ok:
            raise fail(
                f"{what} logits differ from the MLX model",
                f"{d.describe()} (allowed at {quant}: relative <= {max_rel}, top-1 >= {min_top1:.0%})",
            )
        if tune and self.ckpt is not None and verify.distance(self.reference, self.base) > 0:
            self._check_tune_kept(verify.tune_kept(got, self.reference, self.base), quant)

    def _check_tune_kept(self, kept: float, quant: str) -> None:
        need = MIN_TUNE_KEPT[quant]
        ok = kept >= need
        drift = not ok and self.checks.allow_drift
        self.checks.append(
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
            raise fail(
                f"the tune does not survive {quant}",
                f"only {kept:.1%} of its effect on the logits is left (need {need:.0%})",
                drift_hint(quant),
            )


def require_architecture(
    config: dict[str, Any], supported: Collection[str], fmt: str, instead: tuple[str, ...]
) -> str:
    """``config``'s model_type when ``fmt`` export can write it; else an FtError naming what it supports and
    the formats to use ``instead``."""
    model_type = config.get("model_type")
    if model_type not in supported:
        others = [f"--format {f}" for f in instead]
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{fmt} export supports {', '.join(sorted(supported))} models; this one is {model_type!r}",
            f"export it with {', '.join(others[:-1])} or {others[-1]} instead",
        )
    return str(model_type)


def check_early(fmt: str, quant: str, base_dir: Path) -> None:
    """Refuse what cannot work before spending time loading and fusing the model."""
    from ft.models.export.folders import check_hf
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
        check_hf(config, quant)
    elif fmt == "peft" and quant not in ("f32", "f16"):
        raise FtError(
            ErrorCode.USAGE, f"--quant {quant} is not available for --format peft", "use f32 (default) or f16"
        )
