"""Helpers for the engine tests: a 2-layer random-weight Llama and small tokenized datasets."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama

from ft.engine.batching import ArrayExamples

VOCAB = 128


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, tie: bool = True) -> llama.Model:
    """A random Llama small enough to train in milliseconds (float32)."""
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def random_examples(
    n: int, lo: int = 5, hi: int = 40, seed: int = 0, prompt_share: float = 0.5, system: int = 0
) -> ArrayExamples:
    """``n`` examples of random lengths; the first ``prompt_share`` of each is an untrained prompt.

    ``system``: every example starts with the same ``system`` tokens (untrained), like a system prompt.
    """
    rng = np.random.default_rng(seed)
    head = rng.integers(3, VOCAB, size=system).astype(np.int32)
    toks, masks = [], []
    for _ in range(n):
        L = int(rng.integers(lo, hi + 1))
        toks.append(np.concatenate([head, rng.integers(3, VOCAB, size=L).astype(np.int32)]))
        m = np.zeros(L + system, dtype=bool)
        m[system + max(1, int(L * prompt_share)) :] = True
        masks.append(m)
    return ArrayExamples(toks, masks, record_ids=list(range(100, 100 + n)))


def reference_example_loss(model: nn.Module, tokens: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Mean cross-entropy of one example run alone, unpadded, with full logits (the plain definition).

    The oracle the packed/grouped batch tests compare against.
    """
    x = mx.array(np.asarray(tokens, dtype=np.int32)[None, :-1])
    y = mx.array(np.asarray(tokens, dtype=np.int32)[None, 1:])
    m = mx.array(np.asarray(mask, dtype=np.float32)[None, 1:])
    logits = model(x).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, y, reduction="none")
    n = float(m.sum().item())
    return float(((ce * m).sum() / max(n, 1.0)).item()), int(n)
