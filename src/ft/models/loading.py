"""Load a model folder (mlx-lm layout) for training, evaluation or serving.

One rule decides the math precision on CPU: a quantized base trains ~15x slower than float32 on
MLX's CPU backend (quantized matmuls have no BLAS path), so on CPU a quantized model is dequantized
to float32 when that fits in memory. On a GPU (Metal/CUDA) quantized weights are kept (QLoRA).
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ft.errors import ErrorCode, FtError

log = logging.getLogger(__name__)

# Dequantize on CPU only when float32 weights take at most this share of available memory
# (the rest is for LoRA, optimizer state, activations and the OS).
DEQUANTIZE_MEMORY_SHARE = 0.4

_DTYPES = {"float32", "float16", "bfloat16"}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: dict[str, Any]
    quantized: bool  # as stored on disk
    dequantized: bool  # turned into float weights by this load
    dtype: str  # dtype of the float weights after loading
    note: str = ""  # one sentence for the run log about the precision decision (empty when nothing happened)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{model_dir} is not a model folder (no config.json)",
            "pull it first: ft models pull <name or repo>",
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FtError(ErrorCode.MODEL_INVALID, f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def is_quantized(model: Any) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules())


def parameter_count(model: Any) -> int:
    """Parameters as the unquantized model would count them."""
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model))


def available_memory_bytes() -> int:
    """Memory a new allocation can use now: RAM available on CPU, the device limit on a GPU."""
    import mlx.core as mx
    import psutil

    avail = psutil.virtual_memory().available
    if not on_cpu():
        info = mx.device_info()
        # Metal: the recommended working set; CUDA: the GPU's free memory
        limit = (
            info.get("max_recommended_working_set_size") or info.get("memory_size") or info.get("free_memory")
        )
        if limit:
            return int(limit)
    return int(avail)


def dequantize(model: Any, dtype: str = "float32") -> Any:
    """Replace quantized layers by float ones, computing in float32 so no precision is lost on the way."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    target = getattr(mx, dtype)
    swaps = []
    make: Callable[..., Any]
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            make = lambda w, m=module: nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)  # noqa: E731
        elif isinstance(module, nn.QuantizedEmbedding):
            make = lambda w: nn.Embedding(w.shape[0], w.shape[1])  # noqa: E731
        else:
            continue
        biases = module.get("biases")
        w = mx.dequantize(
            module.weight,
            module.scales.astype(mx.float32),
            None if biases is None else biases.astype(mx.float32),
            module.group_size,
            module.bits,
            getattr(module, "mode", "affine"),
        )
        layer = make(w)
        layer.weight = w.astype(target)
        if "bias" in module:
            layer.bias = module.bias.astype(target)
        swaps.append((name, layer))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    model.set_dtype(target)
    mx.eval(model.parameters())
    return model


def load_model_dir(
    model_dir: Path | str,
    *,
    dequantize: bool | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``model_dir`` with mlx-lm and apply the precision policy; see :func:`load`."""
    model_dir = Path(model_dir)
    if dtype == "auto":  # train.yml's model.dtype: float32 on CPU (BLAS path), bfloat16 on a GPU
        dtype = "float32" if on_cpu() else "bfloat16"
    if dtype is not None and dtype not in _DTYPES:
        raise FtError(
            ErrorCode.USAGE, f"unknown dtype {dtype!r}", f"use auto or one of {', '.join(sorted(_DTYPES))}"
        )
    config = read_config(model_dir)
    if not list(model_dir.glob("model*.safetensors")):
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{model_dir} has no model*.safetensors weights",
            "pull the model again: ft models pull <source>",
        )
    if config.get("model_file") and not trust_remote_code:
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{model_dir} needs to run custom code ({config['model_file']}) to build its architecture",
            "only if you trust its author, pass --trust-remote-code",
        )

    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    # mlx_lm.load downloads when the path does not exist; we checked it does, so it only reads files.
    try:
        model, tokenizer, config = mlx_load(
            str(model_dir), return_config=True, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        msg = str(e)
        if "not supported" in msg:
            raise FtError(
                ErrorCode.MODEL_UNSUPPORTED,
                f"{model_dir}: {msg} (model_type {config.get('model_type')!r})",
                "upgrade mlx-lm, or pick a model of an architecture mlx-lm supports",
            ) from e
        raise FtError(ErrorCode.MODEL_INVALID, f"{model_dir}: cannot load weights: {msg}") from e

    quantized = is_quantized(model)
    note = ""
    if dequantize is None:
        dequantize = False
        if quantized and on_cpu():
            need = parameter_count(model) * 4
            avail = available_memory_bytes()
            dequantize = need <= DEQUANTIZE_MEMORY_SHARE * avail
            if not dequantize:
                note = (
                    f"kept the base quantized on CPU: float32 weights ({need / 1e9:.1f} GB) would not fit "
                    f"in {avail / 1e9:.1f} GB available; training will be slow"
                )
                log.warning(
                    "keeping %s quantized on CPU: float32 weights (%.1f GB) would not fit in %.1f GB available; "
                    "training will be slow",
                    model_dir.name,
                    need / 1e9,
                    avail / 1e9,
                )
    did = False
    if dequantize and quantized:
        target = dtype or ("float32" if on_cpu() else "bfloat16")
        log.info(
            "dequantizing %s to %s%s (quantized matmuls are slow there)",
            model_dir.name,
            target,
            " on CPU" if on_cpu() else "",
        )
        dequantize_fn(model, target)
        did = True
        note = (
            f"dequantized the quantized base to {target}"
            + (" on CPU" if on_cpu() else "")
            + f" ({parameter_count(model) * (4 if target == 'float32' else 2) / 1e9:.2f} GB): "
            "quantized matmuls are much slower than BLAS there"
        )
    elif dtype is not None:
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())

    if did:
        final = target
    elif dtype is not None:
        final = dtype
    else:  # the most common dtype of float weights (scales of quantized layers are not weights)
        kinds = Counter(
            str(v.dtype).split(".")[-1]
            for k, v in _leaves(model)
            if k.endswith(".weight") and mx.issubdtype(v.dtype, mx.floating)
        )
        final = kinds.most_common(1)[0][0] if kinds else "unknown"
    return LoadedModel(model, tokenizer, config, quantized=quantized, dequantized=did, dtype=final, note=note)


dequantize_fn = dequantize

Purpose = Literal["train", "evaluate", "export", "serve"]


def load_for(
    model_dir: Path | str,
    purpose: Purpose,
    *,
    method: str = "lora",
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    keep_quantized: bool = False,
) -> LoadedModel:
    """Load a run's base model for ``purpose``: the one place that decides precision for train, evaluate,
    export and serve.

    * train, evaluate: ``dtype`` is the run's ``model.dtype``; QLoRA keeps stored quantized weights
      (training ran on them, so the base is scored on the same weights); otherwise a quantized base is
      dequantized on CPU when it fits (see :func:`load_model_dir`).
    * export: float32, dequantized -- adding a small LoRA update to 4-bit weights and re-quantizing
      rounds most of it away, so the merge happens in float.
    * serve: weights as stored (``keep_quantized``: never dequantized).

    ``trust_remote_code`` is the run's ``model.trust_remote_code`` (or the consent given at pull time):
    a model that needed its own code to train is evaluated, exported and served with it.
    """
    if purpose == "export":
        return load_model_dir(
            model_dir, dequantize=True, dtype="float32", trust_remote_code=trust_remote_code
        )
    if purpose == "serve":
        return load_model_dir(
            model_dir, dequantize=False if keep_quantized else None, trust_remote_code=trust_remote_code
        )
    return load_model_dir(
        model_dir,
        dequantize=False if method == "qlora" else None,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )


def share_weights(model: Any) -> Any:
    """A second module tree over the same weight arrays (no copy): adapters attached to it leave
    ``model`` untouched, and the base weights stay in memory once (the server's base and tuned models)."""
    import mlx.nn as nn

    def clone(value: Any) -> Any:
        if isinstance(value, nn.Module):
            new = copy.copy(value)  # a new module: its own dict of entries and its own attributes
            for k, v in value.items():
                dict.__setitem__(new, k, clone(v))
            return new
        if isinstance(value, list):
            return [clone(v) for v in value]
        if isinstance(value, tuple):
            return tuple(clone(v) for v in value)
        if isinstance(value, dict):
            return {k: clone(v) for k, v in value.items()}
        return value  # arrays and plain values are shared

    return clone(model)


def _leaves(model: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def load(
    model_dir: Path | str,
    *,
    dequantize: bool | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from an mlx-lm layout folder.

    ``dequantize``: None = automatic (on CPU a quantized model becomes float32 when it fits in memory,
    logged); True/False force it. ``dtype``: float32/float16/bfloat16 for the float weights (and the
    dequantized ones); "auto" = float32 on CPU (half precision matmuls are slow there), bfloat16 on a
    GPU; None = as stored. The tokenizer is mlx-lm's TokenizerWrapper (``apply_chat_template``,
    ``eos_token_ids``, streaming detokenizer).
    """
    loaded = load_model_dir(
        model_dir, dequantize=dequantize, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return loaded.model, loaded.tokenizer
