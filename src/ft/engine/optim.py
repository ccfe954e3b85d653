"""Optimizers for the trainable parameters: AdamW (with bias correction, as PyTorch), Adafactor, SGD."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import mlx.optimizers as optim

OptimizerName = Literal["adamw", "adafactor", "sgd"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: OptimizerName = "adamw"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd


def build_optimizer(spec: OptimizerSpec, lr: float | Callable[[mx.array], mx.array]) -> optim.Optimizer:
    if spec.name == "adamw":
        # bias_correction=True is what torch.optim.AdamW does; MLX's default (False) is a different optimizer.
        return optim.AdamW(
            learning_rate=lr,
            betas=list(spec.betas),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            bias_correction=True,
        )
    if spec.name == "adafactor":
        # A given learning rate (and schedule) replaces Adafactor's own relative step size.
        return optim.Adafactor(
            learning_rate=lr, relative_step=False, scale_parameter=False, weight_decay=spec.weight_decay
        )
    if spec.name == "sgd":
        return optim.SGD(learning_rate=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r}")


def global_norm(grads: dict) -> mx.array:
    """sqrt of the sum of squares of every gradient, accumulated in float32."""
    from mlx.utils import tree_flatten

    leaves = [g for _, g in tree_flatten(grads)]
    if not leaves:
        return mx.array(0.0)
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for g in leaves))
