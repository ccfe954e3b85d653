"""Model folders: mlx-lm loadable (optionally quantized) and Hugging Face (safetensors for transformers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ft.errors import ErrorCode, FtError
from ft.models.export import TOKENIZER_FILES
from ft.models.export.checks import require_architecture

HF_WEIGHTS = "model.safetensors"
CONFIG = "config.json"

# Architectures whose mlx-lm parameter names are exactly the Hugging Face checkpoint names.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

_FLOAT = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_QUANT_BITS = {"q8_0": 8, "q4_0": 4}
MLX_GROUP_SIZE = 32  # the block size of llama.cpp's q8_0/q4_0, so the same names mean a similar precision


def float_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without any quantization entries (for a fused float model)."""
    out = dict(config)
    for key in ("quantization", "quantization_config"):
        out.pop(key, None)
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise FtError(
            ErrorCode.MODEL_INVALID, f"{src} has no tokenizer files (tokenizer.json or tokenizer.model)"
        )
    return copied


def write_mlx_folder(
    out: Path, model: Any, config: dict[str, Any], src_dir: Path, quant: str
) -> dict[str, Any]:
    """An mlx-lm folder of the fused ``model`` (changed in place: cast or quantized); returns its config."""
    import mlx.core as mx
    from mlx_lm.utils import quantize_model, save_config, save_model

    config = float_config(config)
    if quant in _QUANT_BITS:
        model, config = quantize_model(model, config, group_size=MLX_GROUP_SIZE, bits=_QUANT_BITS[quant])
    elif quant in _FLOAT:
        model.set_dtype(getattr(mx, _FLOAT[quant]))
        config["torch_dtype"] = _FLOAT[quant]
    else:
        raise FtError(ErrorCode.USAGE, f"unknown precision {quant!r} for an mlx export")
    mx.eval(model.parameters())
    save_model(out, model, donate_model=False)
    copy_tokenizer_files(src_dir, out)
    save_config(dict(config), config_path=out / CONFIG)
    return config


def check_hf(config: dict[str, Any], quant: str) -> str:
    """``config``'s model_type when a Hugging Face folder of it can be written at ``quant``; else FtError."""
    model_type = require_architecture(config, HF_ARCHITECTURES, "Hugging Face", ("mlx", "peft"))
    if quant not in _FLOAT:
        raise FtError(
            ErrorCode.USAGE,
            f"--quant {quant} is not available for --format hf (transformers reads float safetensors)",
            "use --quant f16, bf16 or f32; quantize afterwards with your serving tool",
        )
    return model_type


def write_hf_folder(
    out: Path, tensors: dict[str, Any], config: dict[str, Any], src_dir: Path, quant: str
) -> dict[str, Any]:
    """A Hugging Face folder: ``model.safetensors`` (torch layout), ``config.json``, tokenizer files."""
    import mlx.core as mx

    model_type = check_hf(config, quant)
    dtype = getattr(mx, _FLOAT[quant])
    config = float_config(config)
    tied = bool(config.get("tie_word_embeddings", False))
    weights = {
        k: v.astype(dtype)
        for k, v in tensors.items()
        if not k.endswith("rotary_emb.inv_freq") and not (tied and k == "lm_head.weight")
    }
    mx.save_safetensors(str(out / HF_WEIGHTS), weights, metadata={"format": "pt"})
    config.setdefault("architectures", [HF_ARCHITECTURES[model_type]])
    config["torch_dtype"] = _FLOAT[quant]
    (out / CONFIG).write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    copy_tokenizer_files(src_dir, out)
    if not (out / "generation_config.json").is_file():
        gen = {
            k: config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(k) is not None
        }
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return config
