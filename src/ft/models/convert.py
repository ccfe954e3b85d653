"""Write a model folder in another precision: --quantize 4|8 (MLX affine quantization) and --dtype."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Precision:
    """What a pulled model is converted to: ``--quantize 4|8`` and/or ``--dtype`` (neither: kept as it is).
    Creating one checks both (FtError naming the allowed values)."""

    quantize: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANT_BITS:
            raise FtError(ErrorCode.USAGE, f"--quantize {self.quantize}: use 4 or 8")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise FtError(ErrorCode.USAGE, f"--dtype {self.dtype}: use one of {', '.join(DTYPES)}")

    @property
    def converts(self) -> bool:
        return self.quantize is not None or self.dtype is not None

    @property
    def name_suffix(self) -> str:
        """Added to the default model name: ``-4bit``, ``-bfloat16`` or nothing."""
        return f"-{self.quantize}bit" if self.quantize else (f"-{self.dtype}" if self.dtype else "")

    def describe(self) -> str:
        parts = ([f"quantize {self.quantize}-bit"] if self.quantize else []) + (
            [f"dtype {self.dtype}"] if self.dtype else []
        )
        return " ".join(parts)


def convert(src: Path, dst: Path, to: Precision, trust_remote_code: bool = False) -> None:
    """Load ``src`` with mlx-lm, change precision, and write a complete folder into ``dst`` (which exists)."""
    quantize, dtype = to.quantize, to.dtype
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
