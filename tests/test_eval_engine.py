"""Evaluation math on a 2-layer random Llama: known answers and direct computations."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from engine_helpers import VOCAB, random_examples, tiny_llama
from ft.engine import evaluate as ev
from ft.engine.batching import ArrayExamples


def _direct(model, data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example, run alone with full logits: summed cross-entropy, trained tokens, argmax hits (numpy)."""
    sums, counts, hits = [], [], []
    for i in range(len(data)):
        toks = np.asarray(data.tokens(i), dtype=np.int64)
        mask = np.asarray(data.mask(i), dtype=bool)[1:]
        logits = np.array(model(mx.array(toks[None, :-1].astype(np.int32))).astype(mx.float32))[0].astype(
            np.float64
        )
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        y = toks[1:]
        ce = -logp[np.arange(len(y)), y]
        sums.append(ce[mask].sum())
        counts.append(mask.sum())
        hits.append((logits.argmax(-1) == y)[mask].sum())
    return np.array(sums), np.array(counts), np.array(hits)


def test_uniform_model_has_the_known_loss() -> None:
    """All-zero weights give all-zero logits: loss = ln V, perplexity = V, argmax = token 0."""
    model = tiny_llama()
    model.update(tree_map(mx.zeros_like, model.parameters()))
    rng = np.random.default_rng(0)
    toks = [rng.integers(0, 4, size=n) for n in (9, 14, 6)]  # small ids so token 0 is often the label
    masks = [np.arange(len(t)) >= 3 for t in toks]
    data = ArrayExamples(toks, masks)
    tot = ev.score(model, data, batch_size=2, max_seq_length=32).total()
    labels = np.concatenate([t[3:] for t in toks])
    assert tot.tokens == len(labels) and tot.examples == 3
    assert tot.loss == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert tot.perplexity == pytest.approx(VOCAB, rel=1e-5)
    assert tot.accuracy == pytest.approx(np.mean(labels == 0))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_score_matches_a_direct_computation(batch_size: int) -> None:
    """Packed, bucketed, head-on-trained-positions scoring == each example alone with full logits."""
    model = tiny_llama(seed=3)
    data = random_examples(13, lo=4, hi=40, seed=5)
    got = ev.score(model, data, batch_size=batch_size, max_seq_length=64)
    sums, counts, hits = _direct(model, data)
    assert got.index.tolist() == list(range(13))
    np.testing.assert_allclose(got.loss_sum, sums, rtol=2e-5, atol=1e-4)
    assert got.tokens.tolist() == counts.tolist()
    assert got.correct.tolist() == hits.tolist()
    tot = got.total()
    assert tot.loss == pytest.approx(
        sums.sum() / counts.sum(), rel=1e-5
    )  # token-weighted, not a mean of means
    assert tot.perplexity == pytest.approx(math.exp(sums.sum() / counts.sum()), rel=1e-5)
    assert tot.accuracy == pytest.approx(hits.sum() / counts.sum())


def test_unpacked_and_chunked_head_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama(seed=4, tie=False)
    data = random_examples(9, seed=8)
    packed = ev.score(model, data, batch_size=4, max_seq_length=64)
    monkeypatch.setattr(ev, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 3)  # 64 positions per head chunk (the floor)
    from ft.engine.losses import check_model

    split = check_model(model)
    unpacked = ev.score(
        model,
        random_examples(9, seed=8),
        batch_size=2,
        max_seq_length=64,
        split=type(split)(split.body, split.head, packing=False),
    )
    np.testing.assert_allclose(packed.loss_sum, unpacked.loss_sum, rtol=1e-5, atol=1e-4)
    assert packed.correct.tolist() == unpacked.correct.tolist()


def test_limit_is_a_fixed_subset_and_groups_sum_exactly() -> None:
    model = tiny_llama(seed=1)
    data = random_examples(20, seed=2)
    a = ev.score(model, data, batch_size=4, max_seq_length=64, limit=7, seed=3)
    b = ev.score(model, data, batch_size=2, max_seq_length=64, limit=7, seed=3)
    assert len(a.index) == 7 and a.index.tolist() == b.index.tolist()
    full = ev.score(model, data, batch_size=4, max_seq_length=64)
    labels = np.arange(20) % 2
    even, odd = full.total(labels == 0), full.total(labels == 1)
    assert even.tokens + odd.tokens == full.total().tokens
    assert even.loss_sum + odd.loss_sum == pytest.approx(full.total().loss_sum)


def test_progress_reports_every_record() -> None:
    seen = []
    ev.score(
        tiny_llama(),
        random_examples(10),
        batch_size=3,
        max_seq_length=64,
        progress=lambda d, n: seen.append((d, n)),
    )
    assert seen[0] == (0, 10) and seen[-1] == (10, 10)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def _greedy_alone(model, prompt, max_tokens, stop) -> list[int]:
    from mlx_lm.generate import generate_step

    out = []
    for tok, _ in generate_step(
        mx.array(np.asarray(prompt, np.int32)),
        model,
        max_tokens=max_tokens,
        sampler=lambda lp: mx.argmax(lp, axis=-1),
    ):
        t = int(tok)
        if t in stop:
            break
        out.append(t)
    return out


def test_batched_greedy_generation_equals_one_prompt_at_a_time() -> None:
    model = tiny_llama(seed=6)
    data = random_examples(5, lo=4, hi=12, seed=9)
    prompts = [data.tokens(i) for i in range(5)]
    free = ev.generate(model, prompts, ev.SamplingOptions(max_tokens=12, batch_size=3))
    assert free.finish == ["length"] * 5 and all(len(t) == 12 for t in free.tokens)
    for p, toks in zip(prompts, free.tokens, strict=True):
        assert toks == _greedy_alone(model, p, 12, set())
    # Stop at a token the first reply produces: that reply ends just before it, with finish "stop".
    stop = free.tokens[0][4]
    got = ev.generate(model, prompts, ev.SamplingOptions(max_tokens=12, batch_size=2, stop_ids=(stop,)))
    assert got.tokens[0] == free.tokens[0][: free.tokens[0].index(stop)] and got.finish[0] == "stop"
    for p, toks in zip(prompts, got.tokens, strict=True):
        assert toks == _greedy_alone(model, p, 12, {stop})
    assert (
        got.generation_tokens == sum(map(len, got.tokens)) + got.finish.count("stop")
        and got.generation_tps > 0
    )
    # mlx-lm counts a prompt's last token as the first generation step, not as prompt processing
    assert got.prompt_tokens == sum(len(p) - 1 for p in prompts)


def test_sampling_is_seeded() -> None:
    model = tiny_llama(seed=7)
    prompts = [random_examples(1, seed=s).tokens(0) for s in range(3)]
    opts = ev.SamplingOptions(max_tokens=10, temperature=1.5, top_p=0.95, seed=11)
    a = ev.generate(model, prompts, opts).tokens
    assert ev.generate(model, prompts, opts).tokens == a
    other = ev.generate(
        model, prompts, ev.SamplingOptions(max_tokens=10, temperature=1.5, top_p=0.95, seed=12)
    ).tokens
    assert other != a
    assert model.training  # the caller's train/eval mode is restored
