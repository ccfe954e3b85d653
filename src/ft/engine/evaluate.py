"""Evaluation math on MLX: per-example loss and next-token accuracy on trained tokens, and batched generation.

:func:`score` streams a tokenized split through the model in the trainer's own batch layout
(:func:`ft.engine.batching.plan_eval`: examples sorted by length, packed into rows of a few bucket
shapes, segment masks so packed examples never see each other) and keeps, per example, the summed
cross-entropy, the number of trained tokens and how many of them the model ranks first. Only those
three numbers per example stay in memory, so a split of any size is scored in bounded memory, and any
grouping (per label, overall) is an exact token-weighted sum afterwards.

Logits are computed only at positions whose next token is trained, and the vocabulary projection runs
in chunks of positions so a long batch never materialises (positions x vocabulary) at once.

:func:`generate` completes prompts with mlx-lm's continuous-batching generator
(``mlx_lm.generate.BatchGenerator``), stopping each at its own stop token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ft.engine.batching import BatchOptions, MicroBatch, TokenizedExamples, collate, index_examples, plan_eval
from ft.engine.losses import ModelSplit, check_model, trained_hidden

# (done, total) after each unit of work.
Progress = Callable[[int, int], None]

# Bytes of float32 logits one vocabulary-projection chunk may hold (positions x vocab x 4).
LOGITS_CHUNK_BYTES = 1 << 28


@dataclass
class ExampleScores:
    """Per-example sums over trained tokens, for the examples that were scored (``index`` into the split)."""

    index: np.ndarray  # int64: example indices in the split
    loss_sum: np.ndarray  # float64: summed cross-entropy (nats)
    tokens: np.ndarray  # int64: trained tokens scored
    correct: np.ndarray  # int64: trained tokens whose argmax prediction was right
    seconds: float = 0.0
    positions: int = 0  # real input positions run through the model

    def total(self, where: np.ndarray | None = None) -> Totals:
        sel = slice(None) if where is None else where
        return Totals(
            float(self.loss_sum[sel].sum()),
            int(self.tokens[sel].sum()),
            int(self.correct[sel].sum()),
            int(np.count_nonzero(self.tokens[sel])),
        )


@dataclass(frozen=True)
class Totals:
    loss_sum: float
    tokens: int
    correct: int
    examples: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy per trained token."""
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        loss = self.loss
        return math.exp(loss) if loss < 700 else float("inf")

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")


def _head_chunk(vocab: int) -> int:
    return max(64, LOGITS_CHUNK_BYTES // (4 * max(1, vocab)))


def _token_stats(
    model: nn.Module, split: ModelSplit, mb: MicroBatch, vocab: int
) -> tuple[mx.array, mx.array]:
    """Cross-entropy and correctness (argmax == label) at the trained positions of a collated micro-batch."""
    k = mb.n_trained
    segments = mx.array(mb.segments) if mb.segments is not None else None
    hidden, head = trained_hidden(model, split, mx.array(mb.inputs), segments, mx.array(mb.positions[:k]))
    labels = mx.array(mb.labels[:k])
    ces, oks = [], []
    step = _head_chunk(vocab)
    for a in range(0, hidden.shape[0], step):
        h = hidden[a : a + step]
        logits = (head(h) if head is not None else h).astype(mx.float32)
        lab = labels[a : a + step]
        # cross-entropy = logsumexp(logits) - logit of the label, in float32
        ces.append(
            mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, lab[:, None], axis=-1).squeeze(-1)
        )
        oks.append(mx.argmax(logits, axis=-1) == lab)
        mx.eval(ces[-1], oks[-1])  # free this chunk's logits before the next one
    return mx.concatenate(ces), mx.concatenate(oks)


def _owners(
    mb_rows: Sequence[Sequence[int]], segments: np.ndarray | None, positions: np.ndarray, R: int
) -> np.ndarray:
    """The example index each flat position belongs to."""
    r = positions // R
    if segments is None:
        first = np.array([row[0] for row in mb_rows], dtype=np.int64)
        return first[r]
    seg = segments.reshape(-1)[positions] - 1  # segment ids are 1-based per row
    table = np.full((len(mb_rows), max(len(row) for row in mb_rows)), -1, dtype=np.int64)
    for k, row in enumerate(mb_rows):
        table[k, : len(row)] = row
    return table[r, seg]


def score(
    model: nn.Module,
    data: TokenizedExamples,
    *,
    batch_size: int = 8,
    max_seq_length: int = 2048,
    limit: int | None = None,
    seed: int = 0,
    split: ModelSplit | None = None,
    progress: Progress | None = None,
) -> ExampleScores:
    """Loss, trained tokens and argmax hits per example of ``data`` (model in eval mode; see module docstring).

    ``limit``: score a fixed seeded subset of that many examples. ``split``: a :func:`check_model`
    result to reuse (it costs a few tiny forwards).
    """
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        split = split or check_model(model)
        index = index_examples(data, max_seq_length)
        opts = BatchOptions(
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            shuffle=False,
            seed=seed,
            packing=None if split.packing else False,
        )
        usable = index.usable
        plans = plan_eval(index, opts, limit) if len(usable) else []
        chosen = (
            np.sort(np.concatenate([np.asarray(p.examples, np.int64) for p in plans]))
            if plans
            else np.zeros(0, np.int64)
        )
        n = len(data)
        loss_sum = np.zeros(n, np.float64)
        tokens = np.zeros(n, np.int64)
        correct = np.zeros(n, np.int64)
        vocab = _vocab_size(model)
        total = sum(len(p.examples) for p in plans)
        done = positions_run = 0
        if progress:
            progress(0, total)
        for sp in plans:
            for mbp in sp.micro_batches:
                mb = collate(data, mbp, index, 0, opts.target_step)
                k = mb.n_trained
                if k == 0:
                    continue
                ce, ok = _token_stats(model, split, mb, vocab)
                pos = mb.positions[:k]
                owners = _owners(mbp.rows, mb.segments, pos.astype(np.int64), mbp.length)
                np.add.at(loss_sum, owners, np.array(ce, dtype=np.float64))
                np.add.at(tokens, owners, 1)
                np.add.at(correct, owners, np.array(ok).astype(np.int64))
                positions_run += mb.n_tokens
            done += len(sp.examples)
            if progress:
                progress(done, total)
    finally:
        model.train(was_training)
    return ExampleScores(
        chosen,
        loss_sum[chosen],
        tokens[chosen],
        correct[chosen],
        seconds=time.perf_counter() - t0,
        positions=positions_run,
    )


def _vocab_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    v = getattr(args, "vocab_size", None)
    if v:
        return int(v)
    emb = getattr(getattr(model, "model", model), "embed_tokens", None)
    return int(emb.weight.shape[0]) if emb is not None else 32000


# ------------------------------------------------------------------------------------ generation
@dataclass
class Generations:
    tokens: list[list[int]]  # generated ids per prompt, stop token excluded
    finish: list[str]  # "stop" (a stop token) or "length" (max_tokens reached)
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_gb: float = 0.0
    seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds else 0.0


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0
    batch_size: int = 8
    stop_ids: tuple[int, ...] = field(default_factory=tuple)


def make_sampler(opts: SamplingOptions) -> Callable[[mx.array], mx.array]:
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    # mlx-lm reads top_p in (0, 1) as "apply nucleus sampling"; 1.0 means off.
    return mlx_make_sampler(temp=opts.temperature, top_p=opts.top_p if 0 < opts.top_p < 1 else 0.0)


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int] | np.ndarray],
    opts: SamplingOptions,
    progress: Progress | None = None,
) -> Generations:
    """Complete every prompt (token ids) with mlx-lm's batch generator; each stops at a stop id or max_tokens.

    Sampling is seeded (``opts.seed``), so the same prompts, model and options give the same text.
    """
    from mlx_lm.generate import BatchGenerator

    out = Generations(tokens=[[] for _ in prompts], finish=["length"] * len(prompts))
    if not prompts:
        return out
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    mx.random.seed(opts.seed)
    bs = max(1, opts.batch_size)
    gen = BatchGenerator(
        model,
        max_tokens=opts.max_tokens,
        stop_tokens=[[t] for t in opts.stop_ids] or None,
        sampler=make_sampler(opts),
        completion_batch_size=bs,
        prefill_batch_size=bs,
    )
    done = 0
    try:
        uids = gen.insert([list(map(int, p)) for p in prompts], [opts.max_tokens] * len(prompts))
        slot = {uid: k for k, uid in enumerate(uids)}
        if progress:
            progress(0, len(prompts))
        with gen.stats() as stats:
            while responses := gen.next_generated():
                for r in responses:
                    k = slot[r.uid]
                    if r.finish_reason != "stop":  # the stop token itself is not part of the reply
                        out.tokens[k].append(int(r.token))
                    if r.finish_reason is not None:
                        out.finish[k] = "stop" if r.finish_reason == "stop" else "length"
                        done += 1
                        if progress:
                            progress(done, len(prompts))
    finally:
        gen.close()
        model.train(was_training)
    out.prompt_tokens = int(stats.prompt_tokens)
    out.prompt_seconds = float(stats.prompt_time)
    out.generation_tokens = int(stats.generation_tokens)
    out.generation_seconds = float(stats.generation_time)
    out.peak_memory_gb = float(stats.peak_memory)
    out.seconds = time.perf_counter() - t0
    return out
