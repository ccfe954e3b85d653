"""Continuous batching: the requests for one loaded model decoded together, on the worker thread.

A :class:`Lane` wraps mlx-lm's ``BatchGenerator`` for one loaded model (a base model, or a tuned
variant sharing the base's weights). Each call of :meth:`Lane.step` runs one decoding step for every
request of the lane that is generating, then one chunk (``prefill_chunk`` tokens) of the prompts
being read, so a long prompt never holds up the others for more than one chunk, and requests join
and leave between steps. Every request keeps its own sampler, logits processors (bias, penalties),
token budget, stop sequences and prompt-cache prefix. A request whose client went away or whose
time ran out is removed from the batch before the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ft.server.generation import (
    CACHE_MODEL,
    Delta,
    Finished,
    SamplingParams,
    StopMatcher,
    TokenLogprob,
    make_processors,
    make_sampler,
    prompt_caches,
    take_cache,
)
from ft.server.source import LoadedModel

PREFILL_BATCH = 8  # prompts read together in one chunk step


class Sink(Protocol):
    """Where a request's events go, and whether it should stop (client gone, time out)."""

    def post(self, event: Any) -> None: ...

    def stop_reason(self) -> str | None: ...


@dataclass
class _Request:
    sink: Sink
    params: SamplingParams
    matcher: StopMatcher
    detokenizer: Any
    prompt_tokens: int
    cached_tokens: int
    t0: float
    t_first: float | None = None
    generated: int = 0
    unsent: int = 0  # tokens whose text is not in a Delta yet
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Lane:
    """The requests of one loaded model, decoded as one batch."""

    def __init__(self, lm: LoadedModel, max_batch: int, prefill_chunk: int):
        from mlx_lm.generate import BatchGenerator

        self.lm = lm
        eos = sorted(getattr(lm.tokenizer, "eos_token_ids", None) or [])
        self.gen = BatchGenerator(
            lm.model,
            stop_tokens=[[t] for t in eos] or None,
            completion_batch_size=max_batch,
            prefill_batch_size=min(PREFILL_BATCH, max_batch),
            prefill_step_size=prefill_chunk,
        )
        self.active: dict[int, _Request] = {}

    def __len__(self) -> int:
        return len(self.active)

    def add(self, sink: Sink, prompt: list[int], params: SamplingParams) -> None:
        cache, cached = take_cache(self.lm, prompt, reuse=True)
        (uid,) = self.gen.insert(
            [prompt[cached:]],
            max_tokens=[params.max_tokens],
            caches=[cache],
            all_tokens=[list(prompt[:cached])],
            samplers=[make_sampler(params)],
            logits_processors=[make_processors(params)],
        )
        self.active[uid] = _Request(
            sink=sink,
            params=params,
            matcher=StopMatcher(params.stop),
            detokenizer=self.lm.tokenizer.detokenizer,
            prompt_tokens=len(prompt),
            cached_tokens=cached,
            t0=time.perf_counter(),
        )

    def fail_all(self) -> list[Sink]:
        sinks = [r.sink for r in self.active.values()]
        self.active.clear()
        self.close()
        return sinks

    def close(self) -> None:
        try:
            self.gen.close()
        except Exception:  # closing only restores a Metal memory setting
            pass

    def step(self) -> list[tuple[Finished, Any]]:
        """Drop stopped requests, then one decoding step and one prompt chunk; returns what finished."""
        done: list[tuple[Finished, Any]] = []
        gone = [(uid, reason) for uid, r in self.active.items() if (reason := r.sink.stop_reason())]
        if gone:
            self.gen.remove([uid for uid, _ in gone])
            for uid, reason in gone:
                stopped = self.active.pop(uid)
                done.append((self._finish(stopped, reason), stopped.sink))
        if not self.active:
            return done
        _, responses = self.gen.next()
        for resp in responses:
            req = self.active.get(resp.uid)
            if req is None:
                continue
            finished = self._token(req, resp)
            if finished is not None:
                del self.active[resp.uid]
                done.append((finished, req.sink))
        return done

    def _token(self, req: _Request, resp: Any) -> Finished | None:
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
        eos = resp.finish_reason == "stop"  # the generator stops on end-of-sequence tokens only
        if not eos:
            req.generated += 1
            req.unsent += 1
            req.detokenizer.add_token(resp.token)
            if req.params.logprobs:
                req.logprobs.append(self._logprob(resp.token, resp.logprobs, req.params.top_logprobs))
        if resp.finish_reason is not None:
            req.detokenizer.finalize()
        piece, hit = req.matcher.feed(req.detokenizer.last_segment)
        if piece:
            self._send(req, piece)
        if hit:
            if resp.finish_reason is None:  # still in the batch: take it out, keeping its KV cache
                kept = self.gen.remove([resp.uid], return_prompt_caches=True).get(resp.uid)
                if kept is not None:
                    self._keep_cache(kept[1], kept[0])
            else:
                self._keep_cache(resp.all_tokens, resp.prompt_cache)
            return self._finish(req, "stop")
        if resp.finish_reason is not None:
            rest = req.matcher.flush()
            if rest or req.unsent:
                self._send(req, rest)
            self._keep_cache(resp.all_tokens, resp.prompt_cache)
            return self._finish(req, resp.finish_reason)
        return None

    def _send(self, req: _Request, text: str) -> None:
        req.sink.post(Delta(text, tokens=req.unsent, logprobs=req.logprobs))
        req.unsent = 0
        req.logprobs = []

    def _keep_cache(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        if tokens and cache:
            prompt_caches(self.lm).insert_cache(CACHE_MODEL, list(tokens), cache)

    def _finish(self, req: _Request, reason: str) -> Finished:
        now = time.perf_counter()
        t_first = req.t_first or now
        dt = now - t_first
        fin = Finished(
            finish_reason=reason,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=req.generated,
            cached_tokens=req.cached_tokens,
            ttft_s=(req.t_first - req.t0) if req.t_first is not None else 0.0,
            generation_tps=(req.generated - 1) / dt if req.generated > 1 and dt > 0 else 0.0,
            text_chars=len(req.matcher.text),
        )
        req.sink.post(fin)
        return fin

    def _logprob(self, token: int, logprobs: Any, k: int) -> TokenLogprob:
        import mlx.core as mx

        tok = self.lm.tokenizer
        top: list[tuple[int, str, float]] = []
        if k > 0:
            idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
            vals = logprobs[idx]
            pairs = sorted(zip(idx.tolist(), vals.tolist(), strict=True), key=lambda p: -p[1])
            top = [(int(i), tok.decode([int(i)]), float(v)) for i, v in pairs]
        return TokenLogprob(token, tok.decode([token]), float(logprobs[token].item()), top)
