"""LoRA/DoRA adapters in Hugging Face PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT's names and conventions (peft.utils.save_and_load.get_peft_model_state_dict, LoraConfig):

* keys ``base_model.model.<module path>.lora_A.weight`` with shape (r, in) and ``...lora_B.weight``
  with shape (out, r) -- torch Linear layout, the transpose of MLX's ``lora_a`` (in, r) and
  ``lora_b`` (r, out);
* the update is ``(lora_alpha / r) * B @ A``; MLX adapters carry the product as ``scale``, so
  ``lora_alpha = scale * r``;
* DoRA's magnitude vector is saved as ``<module path>.lora_magnitude_vector`` (no ``.weight``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ft.errors import ErrorCode, FtError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module>[\w.]+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)


@dataclass
class Adapter:
    """One adapted linear layer, in MLX layout."""

    module: str  # e.g. model.layers.3.self_attn.q_proj
    lora_a: np.ndarray  # (in, r)
    lora_b: np.ndarray  # (r, out)
    scale: float
    magnitude: np.ndarray | None = None  # DoRA's m, (out,)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])


def collect_adapters(model: Any) -> list[Adapter]:
    """Every LoRA/DoRA linear layer of an adapted (not yet fused) MLX model, found by its parameters."""
    import mlx.core as mx

    out = []
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_a") and hasattr(module, "lora_b")):
            continue
        a, b = module.lora_a, module.lora_b
        if a.ndim != 2 or b.ndim != 2:
            raise FtError(
                ErrorCode.MODEL_UNSUPPORTED,
                f"{name}: adapters of {a.ndim}-D tensors (mixture-of-experts or embeddings) have no PEFT form here",
                "export the fused model with --format hf or --format gguf instead",
            )
        if not hasattr(module, "linear") and hasattr(module, "embedding"):
            raise FtError(
                ErrorCode.MODEL_UNSUPPORTED,
                f"{name}: embedding adapters are not exported to PEFT",
                "export the fused model instead",
            )
        m = getattr(module, "m", None)
        to_np = lambda x: np.array(x.astype(mx.float32))  # noqa: E731
        out.append(Adapter(name, to_np(a), to_np(b), float(module.scale), None if m is None else to_np(m)))
    return out


def peft_tensors(adapters: list[Adapter]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for ad in adapters:
        key = PREFIX + ad.module
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(ad.lora_a.T)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(ad.lora_b.T)
        if ad.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = np.ascontiguousarray(ad.magnitude)
    return tensors


def peft_config(
    adapters: list[Adapter], *, base_model: str, n_layers: int | None, dropout: float = 0.0
) -> dict[str, Any]:
    if not adapters:
        raise FtError(
            ErrorCode.EXPORT_FAILED,
            "the checkpoint holds no LoRA/DoRA adapters to export",
            "peft export is for adapter checkpoints; use --format hf for a full model",
        )
    ranks = {ad.rank for ad in adapters}
    scales = {round(ad.scale, 9) for ad in adapters}
    if len(ranks) != 1 or len(scales) != 1:
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"adapters of mixed ranks {sorted(ranks)} or scales {sorted(scales)} are not exported to PEFT yet",
            "export the fused model with --format hf instead",
        )
    dora = {ad.magnitude is not None for ad in adapters}
    if len(dora) != 1:
        raise FtError(ErrorCode.MODEL_UNSUPPORTED, "a mix of LoRA and DoRA layers cannot be one PEFT adapter")
    rank, scale = ranks.pop(), adapters[0].scale
    targets = sorted({ad.module.rsplit(".", 1)[-1] for ad in adapters})
    layers = sorted({int(m.group(1)) for ad in adapters if (m := re.search(r"\.layers\.(\d+)\.", ad.module))})
    all_layers = n_layers is not None and layers == list(range(n_layers))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": float(dropout),
        "target_modules": targets,
        "layers_to_transform": None if all_layers or not layers else layers,
        "layers_pattern": None if all_layers or not layers else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": dora.pop(),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_peft(out: Path, adapters: list[Adapter], config: dict[str, Any], dtype: str = "float32") -> None:
    from safetensors.numpy import save_file

    tensors = {k: v.astype(dtype) for k, v in peft_tensors(adapters).items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_peft(folder: Path) -> tuple[list[Adapter], dict[str, Any]]:
    """Adapters back in MLX layout from a PEFT folder; FtError on any key PEFT would not recognise."""
    from safetensors.numpy import load_file

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    parts: dict[str, dict[str, np.ndarray]] = {}
    bad = []
    for key, value in tensors.items():
        m = KEY_RE.match(key)
        if not m:
            bad.append(key)
            continue
        parts.setdefault(m.group("module"), {})[m.group("kind")] = value
    if bad:
        raise FtError(ErrorCode.EXPORT_FAILED, f"{folder}: keys PEFT would not load: {', '.join(bad[:5])}")
    scale = float(config["lora_alpha"]) / float(config["r"])
    out = []
    for module, p in sorted(parts.items()):
        if "lora_A.weight" not in p or "lora_B.weight" not in p:
            raise FtError(ErrorCode.EXPORT_FAILED, f"{folder}: {module} lacks lora_A or lora_B")
        mag = p.get("lora_magnitude_vector")
        out.append(
            Adapter(
                module,
                p["lora_A.weight"].T.astype(np.float32),
                p["lora_B.weight"].T.astype(np.float32),
                scale,
                None if mag is None else mag.astype(np.float32),
            )
        )
    return out, config
