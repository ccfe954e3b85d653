"""How much memory training a model needs with a given train.yml, estimated from files alone (the memory plan).

    peak = weights + adapters and their gradients + optimizer state + activations + logits

Per position of the largest micro-batch, in elements of the compute dtype, a block keeps
``block = a_h h + a_kv kv + a_f ffn + att heads seq`` (h hidden, kv the key/value width, ffn the MLP width):
all blocks without gradient checkpointing, each block's input and ``c`` blocks' intermediates with it.
Logits are computed on trained positions only: vocab x (2 in the compute dtype + 3 in float32) each.
With gradient checkpointing the last ``checkpoint_keep_last(layers)`` blocks keep their intermediates (not recomputed).
On a GPU the run holds MLX near the plan: ``working_limit_bytes`` (the plan plus ``LIMIT_HEADROOM``) is the
memory limit the trainer sets (``ft.engine.memory.working_set_limit``); without it MLX's queue of command
buffers kept ~10 GB more alive on the Mistral-7B shape.

The constants are fitted to ``mx.get_peak_memory()`` of ft's own compiled steps: on CPU (float32,
fastmath, unfused attention) the embedded SmolLM2-135M [tests/test_models_memory.py], on a GPU the
Mistral-7B shape in bfloat16 with a 4-bit base at 1 x 2,048 and 2 x 2,048, with and without checkpointing
(bench/memory_plan.py, H100, MLX 0.32.4; docs/benchmarks.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from ft.config.train import TrainConfig, checkpoint_keep_last
from ft.models.inspect import FolderInfo

# Share of available memory a run may plan to use: the OS, the data pipeline and MLX's allocator cache need the rest.
FITS_SHARE = 0.85
DEQUANTIZE_MEMORY_SHARE = 0.4  # same rule as ft.models.loading
_OPT_STATE_PER_PARAM = {"adamw": 2, "adafactor": 1, "sgd": 0}  # float32 slots per trainable parameter
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.weight$")
QLORA_GROUP = 64  # ft.engine.lora.AdapterSpec.quant_group_size
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Activation elements per position and block: (a_h, a_kv, a_f, att, c), see the module docstring. MLX's compiled
# GPU graphs fuse the elementwise work (norms, SiLU, RoPE) that the CPU path keeps; the GPU's attention is
# fused (no score matrix), the CPU's is not.
_BLOCK_CPU = (12.0, 5.0, 5.0, 2.0, 1.0)
_BLOCK_GPU = (8.0, 4.0, 3.5, 0.0, 2.5)
_A_EXTRA = 4.0  # embeddings, final norm, the backward pass's running gradient of the hidden states
# A GPU run may hold this much more than its plan while MLX queues work ahead of the GPU (working_limit_bytes).
LIMIT_HEADROOM = 0.10
MIN_HEADROOM_BYTES = 500 * 10**6
_L_COMPUTE = 2.0  # logits and their gradient in the compute dtype
_L_FLOAT32 = 3.0  # the float32 copy for the loss, its exponentials and its gradient


class MemoryEstimate(BaseModel):
    """The memory plan: each part's bytes, the total against the budget, and the changes that would fit."""

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
    advice: list[str] = Field(default_factory=list)
    assumptions: dict[str, Any] = Field(default_factory=dict)
    logits_bytes: int = 0  # the LM head's output and gradients, on trained positions only
    activation_bytes_without_checkpointing: int = 0
    activation_bytes_with_checkpointing: int = 0
    eval_bytes: int = 0  # peak of an evaluation pass (forward only)
    working_limit_bytes: int = 0  # GPU: the memory limit the run holds MLX to (plan + headroom); 0 on CPU
    gradient_checkpointing: bool = False  # what the plan (and the run) uses
    budget_bytes: int = 0  # the share of available memory a run may plan to use

    def lines(self) -> list[str]:
        """The plan as plain lines (train.log, --dry-run): its parts, the total, the fixes."""
        out = self.parts()
        out.append(
            f"total {self.total_bytes / 1e9:.2f} GB of {self.budget_bytes / 1e9:.2f} GB usable: {self.verdict}"
        )
        return out + [f"to fit: {a}" for a in self.advice]

    def parts(self) -> list[str]:
        """One line per part of the plan."""
        gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        rows, seq = self.assumptions.get("micro_batch", ["?", "?"])
        on = self.gradient_checkpointing
        out = [
            f"weights ({self.weights_precision}): {gb(self.weights_bytes)}",
            f"adapters + gradients ({self.trainable_parameters:,} trainable, float32): {gb(self.adapter_bytes)}",
            f"optimizer state: {gb(self.optimizer_bytes)}",
            f"activations of a {rows} x {seq} micro-batch: {gb(self.activation_bytes_without_checkpointing)} "
            f"without gradient checkpointing, {gb(self.activation_bytes_with_checkpointing)} with it "
            f"(planned: {'on' if on else 'off'})",
            f"logits on {self.assumptions.get('trained_positions', '?')} trained positions: {gb(self.logits_bytes)}",
            f"evaluation pass: {gb(self.eval_bytes)}",
        ]
        if self.working_limit_bytes:
            out.append(
                f"MLX held to {gb(self.working_limit_bytes)} while it queues GPU work (plan + headroom)"
            )
        return out


def _hidden(config: dict[str, Any]) -> dict[str, int]:
    c = config.get("text_config", config)
    h = int(c.get("hidden_size") or c.get("n_embd") or c.get("d_model") or 0)
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 1)
    return {
        "hidden": h,
        "kv_heads": int(c.get("num_key_value_heads") or heads),
        "ffn": int(c.get("intermediate_size") or c.get("n_inner") or 4 * h),
        "layers": int(c.get("num_hidden_layers") or c.get("n_layer") or 0),
        "heads": heads,
        "vocab": int(c.get("vocab_size") or 0),
    }


def _block_linear_params(info: FolderInfo) -> int:
    """Parameters of the 2-D weights inside the transformer blocks (what QLoRA quantizes)."""
    total = 0
    for name, t in info.tensors.items():
        m = _LAYER_RE.search(name)
        if m and len(t.shape) == 2 and "norm" not in m.group(2):
            total += t.shape[0] * t.shape[1]
    return total


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


def _activations_per_token(
    dims: dict[str, int], seq: int, checkpointing: bool, on_cpu: bool, keep_last: int
) -> float:
    """Elements of the compute dtype a training step keeps per position of its largest micro-batch."""
    h, f, layers, heads = dims["hidden"], dims["ffn"], dims["layers"], dims["heads"]
    kv = h * dims["kv_heads"] // max(1, heads)
    a_h, a_kv, a_f, att, c = _BLOCK_CPU if on_cpu else _BLOCK_GPU
    block = a_h * h + a_kv * kv + a_f * f + att * heads * seq
    if checkpointing:  # every block's input, c blocks' intermediates while recomputed, and the kept last ones
        kept = min(keep_last, layers)
        return (layers - kept) * h + (c + kept) * block + _A_EXTRA * h
    return layers * block + _A_EXTRA * h


@dataclass(frozen=True)
class _Step:
    """The parts of a training step that grow with its micro-batch: activations, logits, an evaluation pass."""

    dims: dict[str, int]
    compute_bytes: int  # 4 (float32) or 2 (bfloat16/float16)
    on_cpu: bool
    keep_last: int  # blocks gradient checkpointing does not recompute

    def activations(self, rows: int, seq: int, checkpointing: bool) -> int:
        per_token = _activations_per_token(self.dims, seq, checkpointing, self.on_cpu, self.keep_last)
        return int(rows * seq * per_token * self.compute_bytes)

    def logits(self, targets: int) -> int:
        """The head's output, its float32 copy and gradients, on trained positions."""
        return int(targets * self.dims["vocab"] * (_L_COMPUTE * self.compute_bytes + _L_FLOAT32 * 4))

    def eval_pass(self, weights: int, rows: int, seq: int, targets: int) -> int:
        """A forward pass without gradients keeps about one block's intermediates at a time."""
        h, ffn = self.dims["hidden"], self.dims["ffn"]
        out = int(weights + rows * seq * (h * 4 + 5 * ffn) * self.compute_bytes)
        return out + int(targets * self.dims["vocab"] * (self.compute_bytes + 4))


def _weights(
    info: FolderInfo, train: TrainConfig, dtype: str, on_cpu: bool, available: int
) -> tuple[int, str]:
    """Bytes of the base weights as ft.models.loading and ft.engine.lora will hold them, and their precision."""
    params = info.parameters()
    method = train.training.method
    stored = info.quantization_summary()
    if stored != "none":
        if method != "qlora" and on_cpu and params * 4 <= DEQUANTIZE_MEMORY_SHARE * available:
            return params * 4, f"float32 (dequantized from {stored})"
        return info.weights_bytes, stored
    per = _DTYPE_BYTES[dtype]
    if method == "qlora":  # quantized at load: the blocks' linear layers at qlora_bits, the rest as dtype
        bits = train.lora.qlora_bits
        linear = _block_linear_params(info)
        weights = int((params - linear) * per + linear * (bits + 32 / QLORA_GROUP) / 8)
        return weights, f"{bits}-bit blocks (quantized at load), {dtype} embeddings"
    return params * per, dtype


def _trainable(info: FolderInfo, train: TrainConfig, total_layers: int) -> int:
    """Parameters the run trains: all of them, or the adapters' (DoRA adds a magnitude per output feature)."""
    method = train.training.method
    if method == "full":
        return info.parameters()
    lora = train.lora
    n = _lora_params(info, lora.target_modules, lora.layers, lora.rank, total_layers)
    if method == "dora":
        n += n // (2 * lora.rank)  # one magnitude per output feature, roughly
    return n


def _verdict(total: int, budget: int, available: int) -> str:
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    if total <= budget:
        return f"fits: about {gb(total)} needed of {gb(budget)} usable ({gb(available)} available)"
    return f"does not fit: about {gb(total)} needed, {gb(budget)} usable ({gb(available)} available)"


def estimate_training_memory(
    info: FolderInfo,
    train: TrainConfig,
    *,
    available_bytes: int,
    on_cpu: bool,
    micro_batch: tuple[int, int] | None = None,
    targets: int | None = None,
    budget_share: float = FITS_SHARE,
    keep_last: int | None = None,
) -> MemoryEstimate:
    """The memory plan of a run: what each part needs at the peak of its largest micro-batch's step.

    ``micro_batch``: (rows, positions) of the largest micro-batch; default batch_size x max_seq_length.
    ``keep_last``: blocks checkpointing does not recompute (default: ft's rule, as the trainer applies it).
    (what the planner never exceeds). ``targets``: its trained positions (logits are computed there only);
    default every position. ``training.gradient_checkpointing: auto`` is planned on exactly when the run
    would not fit without it.
    """
    dims = _hidden(info.config)
    method = train.training.method
    dtype = train.model.dtype
    compute_bytes = 4 if (on_cpu or dtype == "float32") else 2
    if dtype == "auto":
        dtype = "float32" if on_cpu else "bfloat16"
    kept = checkpoint_keep_last(dims["layers"]) if keep_last is None else keep_last
    step = _Step(dims, compute_bytes, on_cpu, kept)

    weights, precision = _weights(info, train, dtype, on_cpu, available_bytes)
    trainable = _trainable(info, train, dims["layers"])
    adapter = trainable * 4 * 2  # float32 values + gradients
    optimizer = trainable * 4 * _OPT_STATE_PER_PARAM.get(train.training.optimizer, 2)
    fixed = weights + adapter + optimizer

    batch, seq = micro_batch or (train.training.batch_size, train.data.max_seq_length)
    k = targets if targets is not None else batch * seq
    act_off, act_on = step.activations(batch, seq, False), step.activations(batch, seq, True)
    budget = int(budget_share * available_bytes)
    setting = train.training.gradient_checkpointing
    ckpt = setting is True or (setting == "auto" and fixed + act_off + step.logits(k) > budget)
    act = act_on if ckpt else act_off
    eval_bytes = step.eval_pass(weights, batch, seq, k)
    total = max(fixed + act + step.logits(k), eval_bytes)
    fits = total <= budget
    quantized = info.quantization_summary() != "none"
    advice = [] if fits else _fixes(train, quantized, precision, fixed, budget, batch, seq, ckpt, step, k)
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
        verdict=_verdict(total, budget, available_bytes),
        advice=advice,
        assumptions={
            "method": method,
            "micro_batch": [batch, seq],
            "trained_positions": k,
            "compute_dtype": "float32" if compute_bytes == 4 else dtype,
            "device": "cpu" if on_cpu else "gpu",
            "usable_share": budget_share,
        },
        logits_bytes=step.logits(k),
        working_limit_bytes=0 if on_cpu else working_limit(total, available_bytes),
        activation_bytes_without_checkpointing=act_off,
        activation_bytes_with_checkpointing=act_on,
        eval_bytes=eval_bytes,
        gradient_checkpointing=ckpt,
        budget_bytes=budget,
    )


def working_limit(total_bytes: int, available_bytes: int) -> int:
    """The memory limit a GPU run holds MLX to: its plan plus headroom for the queue, within what is available."""
    return int(min(available_bytes, total_bytes + max(LIMIT_HEADROOM * total_bytes, MIN_HEADROOM_BYTES)))


def _fixes(
    train: TrainConfig,
    quantized: bool,
    precision: str,
    fixed: int,
    budget: int,
    batch: int,
    seq: int,
    ckpt: bool,
    step: _Step,
    k: int,
) -> list[str]:
    """The cheapest changes that make the run fit, each computed against the budget (cheapest first)."""
    method = train.training.method
    fixes: list[str] = []
    share = k / max(1, batch * seq)

    def need(b: int, s: int, c: bool) -> int:
        return fixed + step.activations(b, s, c) + step.logits(int(b * s * share))

    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    if fixed < budget:
        if not ckpt and need(batch, seq, True) <= budget:
            fixes.append(
                f"set training.gradient_checkpointing: true (about {gb(need(batch, seq, True))}, "
                "about a third more time per step)"
            )
        c = ckpt or need(batch, seq, True) <= budget
        accum = batch * train.training.grad_accumulation_steps
        if batch > 1 and need(1, seq, ckpt) <= budget:
            fixes.append(
                f"set training.batch_size: 1 and training.grad_accumulation_steps: {accum} "
                f"(same examples per step; about {gb(need(1, seq, ckpt))})"
            )
        elif batch > 1 and not c and need(1, seq, True) <= budget:
            fixes.append(
                f"set training.batch_size: 1, training.grad_accumulation_steps: {accum} and "
                f"training.gradient_checkpointing: true (about {gb(need(1, seq, True))})"
            )

        def longest(c: bool) -> int:  # the longest power-of-two fraction of seq that fits at this batch
            s = seq
            while s > 16 and need(batch, s, c) > budget:
                s //= 2
            return s if s < seq and need(batch, s, c) <= budget else 0

        s_now, s_ckpt = longest(ckpt), (0 if ckpt else longest(True))
        if s_now and s_now >= s_ckpt:
            fixes.append(
                f"lower data.max_seq_length to {s_now} or less (about {gb(need(batch, s_now, ckpt))})"
            )
        elif s_ckpt:
            fixes.append(
                f"lower data.max_seq_length to {s_ckpt} or less with training.gradient_checkpointing: true "
                f"(about {gb(need(batch, s_ckpt, True))})"
            )
    if not quantized and method != "qlora":
        fixes.append(
            "train a 4-bit base: training.method: qlora (or pull a 4-bit copy: ft models pull SOURCE --quantize 4)"
        )
    elif precision.startswith("float32"):
        fixes.append("keep the base quantized: training.method: qlora (slower on CPU, much less memory)")
    if method == "full":
        fixes.append("use training.method: lora instead of full fine-tuning")
    if not fixes:
        fixes.append("use a smaller model")
    return fixes
