"""Adapters by module swapping: LoRA, DoRA, QLoRA and full fine-tuning on an mlx-lm model.

The model is never subclassed. Chosen ``nn.Linear``/``nn.QuantizedLinear`` modules inside the chosen
transformer blocks are replaced by mlx-lm's tuner layers (``mlx_lm.tuner.lora.LoRALinear`` and
``mlx_lm.tuner.dora.DoRALinear``) built with ``from_base()``; :func:`fuse` swaps them back for plain
linear layers holding ``W + (alpha / r) * B A``. Reusing mlx-lm's layers keeps our adapter files
(``lora_a``/``lora_b``/``m`` leaves) loadable by ``mlx_lm`` itself.

Scaling follows PEFT: the adapter output is multiplied by ``alpha / rank`` (mlx-lm's own CLI takes
the product as ``scale``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ft.config.train import LoraSection
from ft.errors import ErrorCode, FtError

Method = Literal["lora", "dora", "qlora", "full"]
ALL_LINEAR = "all-linear"
ADAPTER_LEAVES = frozenset({"lora_a", "lora_b", "m"})
_LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


_LORA = LoraSection()  # train.yml's defaults are the one definition of rank, alpha, targets, layers, bits


@dataclass(frozen=True)
class AdapterSpec:
    """What to train. ``layers``: "all" or the last N transformer blocks. Defaults are train.yml's, but
    dropout (off: what inference and tests want; training passes lora.dropout)."""

    method: Method = "lora"
    rank: int = _LORA.rank
    alpha: float = _LORA.alpha
    dropout: float = 0.0
    target_modules: Sequence[str] | str = tuple(_LORA.target_modules)
    layers: int | Literal["all"] = _LORA.layers
    quant_bits: int = _LORA.qlora_bits  # qlora: bits of the quantized base when it is not quantized already
    quant_group_size: int = 64

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AdapterSpec:
        """The spec :meth:`to_json` wrote (``adapter_config.json``); a missing or wrong field is a ValueError."""
        try:
            targets = d["target_modules"]
            layers = d["layers"]
            return cls(
                method=d["method"],
                rank=int(d["rank"]),
                alpha=float(d["alpha"]),
                dropout=float(d["dropout"]),
                target_modules=targets if isinstance(targets, str) else tuple(targets),
                layers=layers if layers == "all" else int(layers),
                quant_bits=int(d["quant_bits"]),
                quant_group_size=int(d["quant_group_size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not an adapter spec ({type(e).__name__}: {e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "method": self.method,
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "dropout": self.dropout,
            "target_modules": targets,
            "layers": self.layers,
            "quant_bits": self.quant_bits,
            "quant_group_size": self.quant_group_size,
        }


@dataclass
class AdapterSummary:
    """Result of :func:`apply_adapters`: what became trainable."""

    method: str
    trainable_parameters: int
    total_parameters: int
    adapted_modules: list[str] = field(default_factory=list)
    quantized_base: bool = False

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_parameters / max(1, self.total_parameters)

    def describe(self) -> str:
        return (
            f"{self.method}: {self.trainable_parameters / 1e6:.3f}M trainable of "
            f"{self.total_parameters / 1e6:.1f}M parameters ({self.trainable_percent:.3f}%), "
            f"{len(self.adapted_modules)} adapted modules"
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an mlx-lm model, in order."""
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "model"):
        layers = getattr(model.model, "layers", None)
    if not layers:
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{type(model).__name__} exposes no transformer layers",
            "this architecture cannot be fine-tuned by ft yet",
        )
    return list(layers)


def _chosen_blocks(model: nn.Module, layers: int | str) -> list[tuple[int, nn.Module]]:
    all_blocks = blocks(model)
    if layers == "all":
        return list(enumerate(all_blocks))
    n = int(layers)
    if n > len(all_blocks):
        raise FtError(
            ErrorCode.CONFIG_INVALID,
            f"lora.layers = {n} but the model has only {len(all_blocks)} transformer layers",
            f"set lora.layers to at most {len(all_blocks)}, or to all",
        )
    first = len(all_blocks) - n
    return [(i, b) for i, b in enumerate(all_blocks) if i >= first]


def linear_names(model: nn.Module) -> list[str]:
    """Distinct short names of the linear layers inside the transformer blocks (e.g. q_proj)."""
    names: list[str] = []
    for b in blocks(model):
        for path, m in b.named_modules():
            short = path.rsplit(".", 1)[-1]
            if isinstance(m, _LINEAR_TYPES) and short not in names:
                names.append(short)
    return names


def _quantize_base(model: nn.Module, bits: int, group_size: int) -> None:
    """QLoRA on a float model: quantize the linear layers of the blocks (embeddings/head stay float)."""

    def pred(path: str, m: nn.Module) -> bool:
        return isinstance(m, nn.Linear) and ".layers." in f".{path}." and m.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pred)


def has_adapters(model: nn.Module) -> bool:
    """Whether LoRA/DoRA layers are attached already."""
    return any(isinstance(m, LoRALinear | DoRALinear) for _, m in model.named_modules())


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules())


def apply_adapters(model: nn.Module, spec: AdapterSpec) -> AdapterSummary:
    """Freeze ``model`` and make exactly the parameters of ``spec`` trainable (in place)."""
    total = count_parameters(model)
    model.freeze()
    chosen = _chosen_blocks(model, spec.layers)
    if spec.method == "full":
        if is_quantized(model):
            raise FtError(
                ErrorCode.CONFIG_INVALID,
                "full fine-tuning needs float weights but the model is quantized",
                "load it dequantized (the default on CPU), or use training.method: qlora",
            )
        if spec.layers == "all":
            model.unfreeze()
        else:
            for _, b in chosen:
                b.unfreeze()
        return AdapterSummary("full", trainable_count(model), total, [f"layers.{i}" for i, _ in chosen])

    quantized_base = is_quantized(model)
    if spec.method == "qlora" and not quantized_base:
        _quantize_base(model, spec.quant_bits, spec.quant_group_size)
        quantized_base = True
    wanted = None if spec.target_modules == ALL_LINEAR else list(spec.target_modules)
    if wanted is not None:
        available = linear_names(model)
        missing = [t for t in wanted if t not in available]
        if missing:
            raise FtError(
                ErrorCode.CONFIG_INVALID,
                f"lora.target_modules: {', '.join(missing)} not found in this model",
                f"its linear layers are: {', '.join(available)} (or use all-linear)",
            )
    layer_cls = DoRALinear if spec.method == "dora" else LoRALinear
    adapted: list[str] = []
    for i, block in chosen:
        swaps = []
        for path, m in block.named_modules():
            short = path.rsplit(".", 1)[-1]
            if isinstance(m, _LINEAR_TYPES) and (wanted is None or short in wanted):
                swaps.append(
                    (path, layer_cls.from_base(m, r=spec.rank, dropout=spec.dropout, scale=spec.scale))
                )
                adapted.append(f"layers.{i}.{path}")
        if swaps:
            block.update_modules(tree_unflatten(swaps))
    if not adapted:
        raise FtError(
            ErrorCode.CONFIG_INVALID,
            "no layer matched lora.target_modules in the chosen lora.layers",
            f"linear layers in this model: {', '.join(linear_names(model))}",
        )
    mx.eval(model.parameters())
    return AdapterSummary(spec.method, trainable_count(model), total, adapted, quantized_base)


def fuse(model: nn.Module, dequantize: bool = False) -> int:
    """Replace every LoRA/DoRA module by one linear layer computing the same function (in place); returns
    how many were fused. ``dequantize``: a quantized base becomes float (export merges into float)."""
    swaps = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear | DoRALinear)
    ]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    """Flat name -> array of everything being trained (what an adapter checkpoint stores)."""
    return dict(tree_flatten(model.trainable_parameters()))


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def count_parameters(model: nn.Module) -> int:
    """Parameters of the base model as its float version would count them (adapters excluded)."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    n = 0
    for _, m in leaves:
        if hasattr(m, "bits"):  # quantized: packed uint32 words hold 32 // bits weights each
            n += m.weight.size * 32 // m.bits + (m.bias.size if "bias" in m else 0)
        else:
            n += sum(
                v.size for k, v in tree_flatten(m.parameters()) if k.rsplit(".", 1)[-1] not in ADAPTER_LEAVES
            )
    return n
