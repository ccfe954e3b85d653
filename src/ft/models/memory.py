"""How much memory LoRA training of a model needs with a given train.yml, estimated from files alone.

    total = weights + adapters + gradients + optimizer state + activations

Activations (no gradient checkpointing), per token of a micro-batch at max_seq_length:
    layers x (10 h + 4 ffn + heads x seq) + 3 x vocab      elements of the compute dtype
The constants were fitted to mx.get_peak_memory() of real LoRA steps on SmolLM2-135M in float32 on CPU
(batch 1-4, sequence 128-512: within 5%); tests/test_models_memory.py re-checks the fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ft.models.inspect import FolderInfo

# Share of available memory a run may plan to use: the OS, the data pipeline and MLX's allocator cache need the rest.
FITS_SHARE = 0.85
DEQUANTIZE_MEMORY_SHARE = 0.4  # same rule as ft.models.loading
_OPT_STATE_PER_PARAM = {"adamw": 2, "adafactor": 1, "sgd": 0}  # float32 slots per trainable parameter
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.weight$")


@dataclass
class MemoryEstimate:
    weights_bytes: int
    weights_precision: str  # "float32 (dequantized from 4-bit)", "4-bit", ...
    trainable_parameters: int
    adapter_bytes: int  # trainable parameters + their gradients
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    available_bytes: int
    fits: bool
    verdict: str  # one plain sentence
    advice: list[str] = field(default_factory=list)
    assumptions: dict[str, Any] = field(default_factory=dict)


def _hidden(config: dict[str, Any]) -> dict[str, int]:
    c = config.get("text_config", config)
    h = int(c.get("hidden_size") or c.get("n_embd") or c.get("d_model") or 0)
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 1)
    return {
        "hidden": h,
        "ffn": int(c.get("intermediate_size") or c.get("n_inner") or 4 * h),
        "layers": int(c.get("num_hidden_layers") or c.get("n_layer") or 0),
        "heads": heads,
        "vocab": int(c.get("vocab_size") or 0),
    }


def _lora_params(
    info: FolderInfo, targets: list[str] | str, n_layers: int | str, rank: int, total_layers: int
) -> int:
    """rank x (in + out) for each targeted linear layer, with shapes read from the safetensors headers."""
    first = 0 if n_layers == "all" else max(total_layers - int(n_layers), 0)
    total = 0
    for name, t in info.tensors.items():
        m = _LAYER_RE.search(name)
        if not m or int(m.group(1)) < first or len(t.shape) != 2:
            continue
        leaf = m.group(2).split(".")[-1]
        if targets != "all-linear" and leaf not in targets:
            continue
        if targets == "all-linear" and ("norm" in leaf or "embed" in leaf):
            continue
        out_dim, in_dim = t.shape
        q = info.quant_params(name[: -len(".weight")])
        if q is not None:
            in_dim = in_dim * 32 // q[0]
        total += rank * (in_dim + out_dim)
    return total


def estimate_training_memory(
    info: FolderInfo,
    train: Any,  # ft.config.train.TrainConfig (typed loosely so this module needs no config import)
    *,
    available_bytes: int,
    on_cpu: bool,
) -> MemoryEstimate:
    dims = _hidden(info.config)
    params = info.parameters()
    quantized = info.quantization_summary() != "none"
    method = train.training.method
    dtype = train.model.dtype
    compute_bytes = 4 if (on_cpu or dtype == "float32") else 2
    if dtype == "auto":
        dtype = "float32" if on_cpu else "bfloat16"

    # Weights, as ft.models.loading will hold them.
    if (
        quantized
        and method != "qlora"
        and (on_cpu and params * 4 <= DEQUANTIZE_MEMORY_SHARE * available_bytes)
    ):
        weights, precision = params * 4, f"float32 (dequantized from {info.quantization_summary()})"
    elif quantized:
        weights, precision = info.weights_bytes, info.quantization_summary()
    else:
        per = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
        weights, precision = params * per, dtype

    if method == "full":
        trainable = params
    else:
        rank = train.lora.rank
        trainable = _lora_params(info, train.lora.target_modules, train.lora.layers, rank, dims["layers"])
        if method == "dora":
            trainable += trainable // (2 * rank)  # one magnitude per output feature, roughly
    adapter = trainable * 4 * 2  # float32 values + gradients
    optimizer = trainable * 4 * _OPT_STATE_PER_PARAM.get(train.training.optimizer, 2)

    batch, seq = train.training.batch_size, train.data.max_seq_length

    def activations(b: int, s: int) -> int:
        per_token = (
            dims["layers"] * (10 * dims["hidden"] + 4 * dims["ffn"] + dims["heads"] * s) + 3 * dims["vocab"]
        )
        return b * s * per_token * compute_bytes

    act = activations(batch, seq)
    total = weights + adapter + optimizer + act
    budget = FITS_SHARE * available_bytes
    fits = total <= budget
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    if fits:
        verdict = f"fits: about {gb(total)} needed of {gb(available_bytes)} available"
    else:
        verdict = f"does not fit: about {gb(total)} needed, {gb(available_bytes)} available"
    advice: list[str] = []
    if not fits:
        fixed = weights + adapter + optimizer
        if fixed < budget:

            def longest(b: int) -> int:  # the longest power-of-two fraction of seq that fits at batch b
                s = seq
                while s > 16 and fixed + activations(b, s) > budget:
                    s //= 2
                return s if fixed + activations(b, s) <= budget else 0

            accum = batch * train.training.grad_accumulation_steps
            s_now, s_one = longest(batch), longest(1)
            if s_now and s_now < seq:
                advice.append(f"lower data.max_seq_length to {s_now} (or less)")
            if batch > 1 and s_one == seq:
                advice.append(
                    f"set training.batch_size: 1 and training.grad_accumulation_steps: {accum} "
                    "(same examples per step)"
                )
            elif batch > 1 and s_one > s_now:
                advice.append(
                    f"or set training.batch_size: 1, training.grad_accumulation_steps: {accum} and "
                    f"data.max_seq_length: {s_one}"
                )
        if not quantized:
            advice.append(
                "pull a 4-bit copy (ft models pull SOURCE --quantize 4) and train with training.method: qlora"
            )
        elif precision.startswith("float32"):
            advice.append("keep the base quantized: training.method: qlora (slower on CPU, much less memory)")
        if method == "full":
            advice.append("use training.method: lora instead of full fine-tuning")
        if not advice:
            advice.append("use a smaller model")
    return MemoryEstimate(
        weights_bytes=int(weights),
        weights_precision=precision,
        trainable_parameters=int(trainable),
        adapter_bytes=int(adapter),
        optimizer_bytes=int(optimizer),
        activation_bytes=int(act),
        total_bytes=int(total),
        available_bytes=int(available_bytes),
        fits=fits,
        verdict=verdict,
        advice=advice,
        assumptions={
            "method": method,
            "batch_size": batch,
            "max_seq_length": seq,
            "compute_dtype": "float32" if compute_bytes == 4 else dtype,
            "device": "cpu" if on_cpu else "gpu",
        },
    )
