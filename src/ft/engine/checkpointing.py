"""Gradient checkpointing: each transformer block's activations are recomputed in the backward pass.

Without it, a step keeps every intermediate of every block (attention scores, the MLP's wide hidden
states, the norms' inputs) until the backward pass reaches it: ``layers x (~10 hidden + 4 ffn + heads x
seq)`` values per token. With it, a block keeps only its input; the backward pass runs the block's
forward again (``mx.checkpoint``) and takes its gradient from there, so about one block's intermediates
are alive at a time, for roughly one more forward pass of compute.

:func:`checkpoint_blocks` swaps the class of each block for a subclass whose ``__call__`` is
checkpointed (module swapping, as :mod:`ft.engine.lora` and :mod:`ft.engine.fastmath` do: parameters,
their paths and the other modules are untouched; the returned function puts the classes back). It
composes with adapters (LoRA/DoRA/QLoRA or full: a block's trainable parameters are explicit inputs of
the checkpointed function, so their gradients flow), with fastmath's swapped MLP/attention, with
compiled steps, and with the loss's cache stand-ins:

* :class:`~ft.engine.losses.SegmentMask` (packed rows) holds a constant mask: passed through as is.
* :class:`~ft.engine.losses.PrefixKV` (rows after a shared prefix) holds the prefix's keys and values,
  which need gradients: they become explicit inputs.
* :class:`~ft.engine.losses.PrefixCapture` (the shared prefix's own pass) is written by the block: the
  captured keys and values become explicit outputs.

Any other cache (mlx-lm's KV caches at generation) and evaluation mode run the block as it is.

Dropout stays correct: each block call draws one key from MLX's global random state, and the block's
dropout layers (swapped for :class:`KeyedDropout`) draw their masks from that key, in the forward and
again in its recomputation, so the backward pass sees the forward's masks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ft.config.train import checkpoint_keep_last
from ft.engine.lora import blocks
from ft.engine.losses import PrefixCapture, PrefixKV, SegmentMask

_SUBCLASSES: dict[type, type] = {}
_DROPOUT_KEYS: list[list[mx.array]] = []  # the key of the block being run (forward or recomputation)


class KeyedDropout(nn.Dropout):
    """Dropout that draws from the running checkpointed block's key, so its recomputation gets the same mask."""

    def __call__(self, x: mx.array) -> mx.array:
        if self._p_1 == 1 or not self.training or not _DROPOUT_KEYS:
            return super().__call__(x)
        slot = _DROPOUT_KEYS[-1]
        slot[0], sub = mx.random.split(slot[0])
        mask = mx.random.bernoulli(self._p_1, x.shape, key=sub)
        return (mask * x) * (1 / self._p_1)


def _checkpointed_class(base: type) -> type:
    if base in _SUBCLASSES:
        return _SUBCLASSES[base]
    base_call = base.__call__

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        cache = kwargs.get("cache", args[2] if len(args) > 2 else None)
        if (
            not self.training
            or not args
            or not (cache is None or isinstance(cache, SegmentMask | PrefixKV | PrefixCapture))
        ):
            return base_call(self, *args, **kwargs)
        # Only the hidden states (and the trainable parameters, prefix keys/values) are inputs of the
        # checkpointed function: the mask and any other argument are constants of the block, closed over, so
        # no gradient is asked of them (MLX's fused attention has no gradient for its mask on a GPU).
        x, rest = args[0], args[1:2]
        kwargs = {k: v for k, v in kwargs.items() if k != "cache"}
        # One key per block call with dropout, drawn from the global state (which advances as a dropout's would).
        drops = any(isinstance(m, KeyedDropout) and m._p_1 < 1 for m in self.modules())
        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32) if drops else None
        prefix_kv = (cache.pk, cache.pv) if isinstance(cache, PrefixKV) else None

        def inner(params: Any, prefix_kv: Any, x: mx.array) -> Any:
            saved = self.trainable_parameters()
            self.update(params)
            c = cache
            if isinstance(cache, PrefixKV):
                c = copy.copy(cache)
                c.pk, c.pv = prefix_kv
            elif isinstance(cache, PrefixCapture):
                c = PrefixCapture()
            if key is not None:
                _DROPOUT_KEYS.append([key])
            try:
                out = base_call(self, x, *rest, cache=c, **kwargs)
            finally:
                if key is not None:
                    _DROPOUT_KEYS.pop()
                self.update(saved)
            if isinstance(c, PrefixCapture):
                return out, c.keys, c.values
            return out

        result = mx.checkpoint(inner)(self.trainable_parameters(), prefix_kv, x)
        if isinstance(cache, PrefixCapture):
            out, cache.keys, cache.values = result
            return out
        return result

    sub = type(base.__name__, (base,), {"__call__": __call__, "__ft_checkpointed__": True})
    _SUBCLASSES[base] = sub
    return sub


def is_checkpointed(model: nn.Module) -> bool:
    return any(getattr(type(b), "__ft_checkpointed__", False) for b in blocks(model))


def checkpoint_blocks(model: nn.Module, keep_last: int | None = None) -> Callable[[], None]:
    """Recompute the transformer blocks of ``model`` in the backward pass, all but the last ``keep_last``
    (None: :func:`ft.config.train.checkpoint_keep_last` of them); returns the undo.

    The backward pass starts with the last block, right where its forward ended: recomputing it saves
    little memory at the peak (its intermediates are alive then either way) for a whole block of compute,
    so ``torch.utils.checkpoint.checkpoint_sequential`` leaves its last segment out too."""
    swapped: list[tuple[nn.Module, type]] = []
    chosen = blocks(model)
    keep_last = checkpoint_keep_last(len(chosen)) if keep_last is None else keep_last
    for b in chosen[: max(0, len(chosen) - keep_last)]:
        base = type(b)
        if getattr(base, "__ft_checkpointed__", False):
            continue
        b.__class__ = _checkpointed_class(base)
        swapped.append((b, base))
        for _, m in b.named_modules():
            if type(m) is nn.Dropout:
                m.__class__ = KeyedDropout
                swapped.append((m, nn.Dropout))

    def restore() -> None:
        for b, base in swapped:
            b.__class__ = base

    return restore
