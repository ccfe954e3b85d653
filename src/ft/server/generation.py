"""Prompt building, sampling settings and the pieces of one generation, used on the server's worker thread.

Generation itself is batched (see :mod:`ft.server.batching`): requests for the same model are decoded
together by mlx-lm's ``BatchGenerator``, each with its own sampler, logits processors, token budget
and stop sequences. Around it this module provides:

* a prompt cache (mlx-lm's LRUPromptCache): the KV caches of recent requests are kept with their
  tokens; a new request starts from the one sharing its longest prefix (trimmed to it) and only feeds
  the new tokens. A chat that grows turn by turn then costs only its new message, not the whole
  history again, even with several clients taking turns.
* stop sequences, matched on the decoded text; text that might be the start of a stop sequence
  is held back from the stream until it is known not to be one.
* per-request samplers: greedy requests share one batched argmax; a seeded request draws from its own
  random key, so the same seed gives the same text whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ft.server.errors import ApiError
from ft.server.source import LoadedModel

CACHE_KEY = "prompt_cache"
CACHE_MODEL = "model"  # mlx-lm's cache is keyed by model too; each loaded model has its own cache
# KV caches kept per loaded model (mlx-lm's LRUPromptCache): a few conversations at once, bounded in bytes.
PROMPT_CACHE_ENTRIES = 8
PROMPT_CACHE_BYTES = 1 << 30
# Below this a temperature is treated as 0 (greedy): dividing logits by it would overflow to inf/nan.
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False  # report the log-probability of each generated token
    top_logprobs: int = 0  # and of this many most likely alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_p == 0


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and (when asked) the most likely alternatives."""

    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New text for the client, and the tokens it came from (their log-probabilities when asked)."""

    text: str
    tokens: int = 1
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    """The end of one generation, with what the access log and `usage` report."""

    finish_reason: str  # stop | length | timeout | cancelled
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    generation_tps: float
    text_chars: int = 0


def make_sampler(params: SamplingParams) -> Any:
    """The request's sampler over log-probabilities; None for greedy (the batch's shared argmax)."""
    if params.greedy:
        return None
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    inv_temp = 1.0 / params.temperature
    top_p = params.top_p
    key = [mx.random.key(params.seed)] if params.seed is not None else None

    def sample(logprobs: Any) -> Any:
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def make_processors(params: SamplingParams) -> list[Any]:
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        logit_bias=params.logit_bias,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


@dataclass
class StopMatcher:
    """Cuts decoded text at the first stop sequence and holds back a possible partial match."""

    stops: Sequence[str]
    text: str = ""
    emitted: int = 0
    _prefixes: dict[str, int] = field(default_factory=dict)

    def feed(self, segment: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to send now, whether a stop sequence was hit)."""
        self.text += segment
        if not self.stops:
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out, False
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i != -1]
        if hits:
            cut = min(hits)
            out, self.emitted = self.text[self.emitted : cut], cut
            self.text = self.text[:cut]
            return out, True
        # Longest tail of the text that is a proper prefix of some stop sequence: not safe to send yet.
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        safe = len(self.text) - hold
        out, self.emitted = self.text[self.emitted : safe], safe
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


def vocab_size(lm: LoadedModel) -> int:
    args = getattr(lm.model, "args", None)
    n = getattr(args, "vocab_size", None)
    return int(n) if n else len(lm.tokenizer.vocab)


def _as_ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "input_ids"):  # a BatchEncoding from some tokenizers
        x = x["input_ids"]
    return [int(t) for t in x]


def chat_prompt(lm: LoadedModel, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the chat rendered by the run's template, or the model's own chat template."""
    try:
        if lm.format_chat is not None:
            return _as_ids(lm.format_chat(messages))
        if not getattr(lm.tokenizer, "chat_template", None):
            raise ApiError(
                400,
                f"model {lm.info.id!r} has no chat template; use /v1/completions with a plain prompt",
                code="no_chat_template",
            )
        return _as_ids(lm.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))
    except ApiError:
        raise
    except Exception as e:  # templates raise on role orders they do not support; that is the request's fault
        raise ApiError(
            400, f"the chat template rejected the messages: {str(e)[:300]}", code="bad_messages"
        ) from None


def text_prompt(lm: LoadedModel, prompt: str | list[str] | list[int]) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if t >= vocab_size(lm)]
        if bad:
            raise ApiError(
                400, f"token id {bad[0]} is outside the vocabulary ({vocab_size(lm)})", param="prompt"
            )
        return ids
    text = str(prompt[0]) if isinstance(prompt, list) else prompt
    bos = getattr(lm.tokenizer, "bos_token", None)
    # Same rule as mlx-lm: add BOS unless the text already starts with it.
    ids = lm.tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return list(ids)


def token_budget(lm: LoadedModel, prompt_len: int, requested: int | None, cap: int | None) -> int:
    """Tokens this request may generate: what it asked for, clamped to the context left and the server cap."""
    if prompt_len == 0:
        raise ApiError(400, "the prompt is empty", param="messages")
    left = None if lm.context_length is None else lm.context_length - prompt_len
    if left is not None and left < 1:
        raise ApiError(
            400,
            f"the prompt is {prompt_len} tokens; the context of {lm.info.id!r} is {lm.context_length}",
            code="context_length_exceeded",
        )
    limits = [x for x in (requested, left, cap) if x is not None]
    return max(1, min(limits)) if limits else 4096


def check_bias(lm: LoadedModel, bias: dict[int, float] | None) -> None:
    if bias:
        n = vocab_size(lm)
        bad = [t for t in bias if t >= n]
        if bad:
            raise ApiError(
                400, f"logit_bias token id {bad[0]} is outside the vocabulary ({n})", param="logit_bias"
            )


def prompt_caches(lm: LoadedModel) -> Any:
    from mlx_lm.models.cache import LRUPromptCache

    if CACHE_KEY not in lm.state:
        lm.state[CACHE_KEY] = LRUPromptCache(max_size=PROMPT_CACHE_ENTRIES, max_bytes=PROMPT_CACHE_BYTES)
    return lm.state[CACHE_KEY]


def take_cache(lm: LoadedModel, prompt: list[int], reuse: bool) -> tuple[list[Any], int]:
    """A KV cache for ``prompt`` and how many of its first tokens it already holds."""
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    if reuse:
        # The stored cache sharing the longest prefix with the prompt, copied and trimmed to that prefix.
        cache, rest = prompt_caches(lm).fetch_nearest_cache(CACHE_MODEL, prompt)
        if cache is not None:
            if not rest:  # the whole prompt is cached; generation still needs the logits of its last token
                if not can_trim_prompt_cache(cache):
                    return make_prompt_cache(lm.model), 0
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            return cache, len(prompt) - len(rest)
    return make_prompt_cache(lm.model), 0
