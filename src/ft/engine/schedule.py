"""Learning-rate schedules over the real number of optimizer steps.

``lr(k)`` for the k-th optimizer update (k = 1 .. total): linear warmup ``peak * k / warmup`` for
k <= warmup, then decay over the remaining ``total - warmup`` updates with progress
``p = (k - 1 - warmup) / (total - warmup)`` in [0, 1): cosine ``min + (peak - min) (1 + cos(pi p)) / 2``,
linear ``min + (peak - min) (1 - p)``, or constant ``peak``. The first update after warmup runs at the
peak; unlike Hugging Face's schedulers the very first update is not wasted at lr 0.

MLX optimizers call a schedule with the count of updates already done (0-based), as an array inside
the compiled step; :func:`make_schedule` returns such a function, and :func:`lr_at` the same value as
a Python float (for plans, plots and tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import mlx.core as mx

Kind = Literal["cosine", "linear", "constant"]


def lr_at(k: int, *, kind: Kind, peak: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Learning rate of the k-th update (1-based)."""
    if warmup > 0 and k <= warmup:
        return peak * k / warmup
    if kind == "constant":
        return peak
    p = min(1.0, max(0.0, (k - 1 - warmup) / max(1, total - warmup)))
    if kind == "cosine":
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return min_lr + (peak - min_lr) * (1.0 - p)
    raise ValueError(f"unknown schedule {kind!r}")


def make_schedule(
    *, kind: Kind, peak: float, warmup: int, total: int, min_lr: float = 0.0
) -> Callable[[mx.array], mx.array]:
    """The schedule as MLX optimizers call it: ``f(updates_done) -> lr`` (array in, array out)."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {kind!r}")
    decay_steps = max(1, total - warmup)

    def schedule(done: mx.array) -> mx.array:
        k = mx.array(done, dtype=mx.float32) + 1.0
        warm = peak * k / max(1, warmup)
        if kind == "constant":
            after = mx.array(peak, dtype=mx.float32)
        else:
            p = mx.clip((k - 1.0 - warmup) / decay_steps, 0.0, 1.0)
            if kind == "cosine":
                after = min_lr + (peak - min_lr) * 0.5 * (1.0 + mx.cos(math.pi * p))
            else:
                after = min_lr + (peak - min_lr) * (1.0 - p)
        return mx.where(k <= warmup, warm, after) if warmup > 0 else after

    return schedule
