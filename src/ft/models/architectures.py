"""Which architectures ft can train, decided from a model's config.json before any weight is downloaded.

mlx-lm implements each architecture as a module ``mlx_lm.models.<model_type>`` (some names are
remapped, e.g. mistral -> llama). Anything mlx-lm can load, ft can pull; the names of the linear
layers LoRA targets by default are recorded here for the families we know.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ft.errors import ErrorCode, FtError

# Attention projections every decoder here has; "all-linear" adds the MLP ones.
_LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

KNOWN_LINEAR_MODULES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LINEAR,
    "mistral": _LLAMA_LINEAR,
    "qwen2": _LLAMA_LINEAR,
    "qwen3": _LLAMA_LINEAR,
    "gemma": _LLAMA_LINEAR,
    "gemma2": _LLAMA_LINEAR,
    "gemma3_text": _LLAMA_LINEAR,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
}


@dataclass(frozen=True)
class Architecture:
    model_type: str  # as written in config.json
    mlx_module: str  # mlx_lm.models.<this>
    linear_modules: tuple[str, ...]  # empty when unknown to ft (LoRA targets must then be named)


def mlx_module_for(model_type: str, architectures: list[str] | None = None) -> str:
    from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING

    for arch in architectures or ():
        remapped = MODEL_ARCHITECTURE_REMAPPING.get((model_type, arch))
        if remapped:
            return remapped
    return MODEL_REMAPPING.get(model_type, model_type)


def architecture_of(
    config: dict[str, Any], *, where: str = "config.json", trust_remote_code: bool = False
) -> Architecture:
    """The architecture of a config, or a clear FtError when mlx-lm cannot build it."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{where} has no model_type",
            "is this a Hugging Face transformers model? ft needs config.json with model_type",
        )
    custom = config.get("model_file") or (config.get("auto_map") and model_type not in KNOWN_LINEAR_MODULES)
    module = mlx_module_for(model_type, config.get("architectures"))
    if importlib.util.find_spec(f"mlx_lm.models.{module}") is None:
        if custom and trust_remote_code and config.get("model_file"):
            return Architecture(model_type, "custom", ())
        hint = "pick a model of an architecture mlx-lm supports (llama, mistral, qwen2, gemma2, phi3, ...)"
        if custom:
            hint += "; this repository ships its own model code, which runs only with --trust-remote-code"
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{where}: architecture {model_type!r} is not supported by mlx-lm",
            hint,
        )
    return Architecture(
        model_type, module, KNOWN_LINEAR_MODULES.get(model_type, KNOWN_LINEAR_MODULES.get(module, ()))
    )
