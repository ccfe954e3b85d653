"""Write a model folder in another precision: --quantize 4|8 (MLX affine quantization) and --dtype."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ft.errors import ErrorCode, FtError
from ft.models.inspect import WEIGHT_GLOB

log = logging.getLogger(__name__)

QUANT_BITS = (4, 8)
QUANT_GROUP_SIZE = 64  # mlx-lm's default: the accuracy/size trade-off its published 4-bit models use
DTYPES = ("float32", "float16", "bfloat16")

# Non-weight files carried over from the source folder as they are.
_CARRY = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.json",
    "*.jinja",
    "*.tiktoken",
    "tiktoken.model",
    "ft_import.json",
)


def copy_model_files(
    src: Path, dst: Path, *, with_weights: bool = True, with_code: bool = False
) -> list[str]:
    """Copy the files a model folder needs from ``src`` to ``dst`` (never pickle files)."""
    patterns = list(_CARRY) + ["config.json"]
    if with_weights:
        patterns += [WEIGHT_GLOB, "model.safetensors.index.json"]
    if with_code:
        patterns.append("*.py")
    copied = []
    for pattern in patterns:
        for p in sorted(Path(src).glob(pattern)):
            if p.is_file() and not (dst / p.name).exists():
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


def convert(
    src: Path,
    dst: Path,
    *,
    quantize: int | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Load ``src`` with mlx-lm, change precision, and write a complete folder into ``dst`` (which exists)."""
    if quantize is not None and quantize not in QUANT_BITS:
        raise FtError(ErrorCode.USAGE, f"--quantize {quantize}: use 4 or 8")
    if dtype is not None and dtype not in DTYPES:
        raise FtError(ErrorCode.USAGE, f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    import mlx.core as mx
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    from ft.models.loading import is_quantized

    model, config = load_model(Path(src), lazy=True, trust_remote_code=trust_remote_code)
    if is_quantized(model) and quantize is not None:
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{src} is already quantized; quantizing it again would lose accuracy twice",
            "pull the full-precision model with --quantize, or use this one as it is",
        )
    if dtype is not None:
        # Casts float weights (and the scales of quantized ones); packed integers stay as they are.
        model.set_dtype(getattr(mx, dtype))
        config["torch_dtype"] = dtype
    if quantize is not None:
        log.info("quantizing to %d bits (group size %d)", quantize, QUANT_GROUP_SIZE)
        model, config = quantize_model(model, config, QUANT_GROUP_SIZE, quantize)
    save_model(dst, model, donate_model=True)
    config.pop("_name_or_path", None)
    save_config(config, config_path=dst / "config.json")
    copy_model_files(Path(src), Path(dst), with_weights=False, with_code=trust_remote_code)
