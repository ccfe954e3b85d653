"""An importance matrix for llama.cpp's quantizer, measured with MLX on the run's own training data.

What llama.cpp's ``llama-imatrix`` computes, per weight matrix: the mean over tokens of the squared
input activation of each input column. The quantizer then spends its rounding error where inputs are
large. Here the fused MLX model runs the token sequences once with every linear layer wrapped to record
its input; names are mapped to GGUF tensor names (q/k row permutations do not touch input columns).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ft.models.export.llamacpp import Imatrix


def compute_imatrix(model: Any, sequences: list[list[int]], config: dict[str, Any]) -> Imatrix:
    """Mean squared input per column of every linear layer of ``model`` over ``sequences``."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    from ft.models.export.gguf_file import name_map

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    class Recorder(nn.Module):
        def __init__(self, name: str, inner: Any):
            super().__init__()
            self.inner = inner
            self._name = name

        def __call__(self, x: Any) -> Any:
            flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            s = mx.sum(flat * flat, axis=0)
            sums[self._name] = s if self._name not in sums else sums[self._name] + s
            counts[self._name] = counts.get(self._name, 0) + flat.shape[0]
            return self.inner(x)

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    model.update_modules(tree_unflatten([(n, Recorder(n, m)) for n, m in linears]))
    try:
        for seq in sequences:
            if len(seq) < 2:
                continue
            mx.eval(model(mx.array([seq])), *sums.values())
    finally:
        model.update_modules(tree_unflatten(linears))
    gguf_names = name_map([f"{n}.weight" for n in sums], config)
    values = {
        gguf_names[f"{n}.weight"]: np.array(sums[n] / counts[n], dtype=np.float32)
        for n in sums
        if f"{n}.weight" in gguf_names
    }
    return Imatrix(values=values, tokens=sum(len(s) for s in sequences))
