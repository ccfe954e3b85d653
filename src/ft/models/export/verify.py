"""Numbers that say whether an exported model computes what the MLX model computes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# A few short, varied texts: prose, code, digits, a chat turn. Enough to catch a wrong layout or
# a lost tune; short so verification costs seconds.
VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, 3 astronauts flew 384,400 km to the Moon and",
)


def prompt_ids(tokenizer: Any, chat: str | None = None) -> list[list[int]]:
    """Token ids of the verification prompts (plus one chat turn when the tokenizer has a template)."""
    ids = [list(tokenizer.encode(p)) for p in VERIFY_PROMPTS]
    if chat is not None and getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": chat}], tokenize=False, add_generation_prompt=True
            )
            ids.append(list(tokenizer.encode(text, add_special_tokens=False)))
        except Exception:  # a template that needs variables we do not pass: the plain prompts suffice
            pass
    return [i for i in ids if i]


def logits(model: Any, ids: list[list[int]]) -> list[np.ndarray]:
    """Float32 logits (tokens x vocabulary) of ``model`` for each prompt."""
    import mlx.core as mx

    out = []
    for seq in ids:
        y = model(mx.array([seq]))
        out.append(np.array(y[0].astype(mx.float32)))
    return out


@dataclass
class LogitsDiff:
    max_abs: float  # largest absolute difference of any logit
    rel: float  # ||a - b|| / ||b|| over all logits
    top1: float  # share of positions whose argmax agrees

    def describe(self) -> str:
        return f"max |Δlogit| {self.max_abs:.4g}, relative {self.rel:.3g}, top-1 agreement {self.top1:.1%}"


def diff(a: list[np.ndarray], b: list[np.ndarray]) -> LogitsDiff:
    """How far logits ``a`` are from reference ``b``."""
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True))
    den = sum(float(np.sum(y**2)) for y in b) or 1.0
    agree = sum(int(np.sum(x.argmax(-1) == y.argmax(-1))) for x, y in zip(a, b, strict=True))
    total = sum(y.shape[0] for y in b) or 1
    return LogitsDiff(
        max_abs=max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True)),
        rel=float(np.sqrt(num / den)),
        top1=agree / total,
    )


def distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Root-mean-square difference of two sets of logits."""
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True))
    n = sum(y.size for y in b) or 1
    return float(np.sqrt(num / n))


def tune_kept(exported: list[np.ndarray], tuned: list[np.ndarray], base: list[np.ndarray]) -> float:
    """1.0 when the export reproduces the tuned model, 0.0 when it is as far from it as the base is.

    The failure this catches: fusing a small LoRA update into a quantized base and re-quantizing can
    round the update away, leaving a file that looks fine and behaves like the base model.
    """
    span = distance(base, tuned)
    if span == 0.0:
        return 1.0
    return 1.0 - distance(exported, tuned) / span
