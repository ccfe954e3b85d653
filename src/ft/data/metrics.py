"""Text metrics for generated replies against a reference: exact match, normalized exact match,
token-overlap F1 and ROUGE-L. Written here (no metric library) so their definitions are exact and
documented:

* ``exact_match``: the strings are equal after trimming leading/trailing whitespace.
* ``normalized_exact_match``: equal after Unicode NFKC, case folding and collapsing every run of
  whitespace to one space (punctuation still counts: "Paris." and "paris" differ).
* ``token_f1``: SQuAD-style bag-of-words F1 over :func:`words` (case-folded runs of letters and
  digits; punctuation dropped): 2PR / (P + R) with P = overlap / predicted words, R = overlap /
  reference words, overlap counted with multiplicity.
* ``rouge_l``: F1 (beta = 1) of the longest common subsequence of :func:`words`.

Two empty texts score 1.0 on every metric; one empty text scores 0.0.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space, trimmed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def words(text: str) -> list[str]:
    """The normalized text's words: runs of letters, digits and underscores (punctuation dropped)."""
    return _WORD.findall(normalize(text))


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f1(overlap, len(pred), len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of memory)."""
    if not a or not b:
        return 0
    if len(b) > len(a):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


@dataclass(frozen=True)
class TextScores:
    exact_match: float
    normalized_exact_match: float
    token_f1: float
    rouge_l: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score_text(prediction: str, reference: str) -> TextScores:
    return TextScores(
        exact_match(prediction, reference),
        normalized_exact_match(prediction, reference),
        token_f1(prediction, reference),
        rouge_l(prediction, reference),
    )


def mean_scores(scores: Sequence[TextScores]) -> TextScores | None:
    if not scores:
        return None
    return TextScores(
        *(float(np.mean([getattr(s, f) for s in scores])) for f in TextScores.__dataclass_fields__)
    )


# ------------------------------------------------------------------ prompts from prepared examples
@dataclass(frozen=True)
class PromptCase:
    """A prepared example cut at its last trained run: what the model is asked, and what it was taught."""

    index: int  # example index in the split
    prompt: np.ndarray  # int32: every token before the last trained run (the conversation so far)
    reference: np.ndarray  # int32: the last trained run (the reply and the template's end of turn)


def last_turn(tokens: np.ndarray, mask: np.ndarray) -> tuple[int, int] | None:
    """[start, end) of the last run of trained tokens, or None when nothing is trained or nothing precedes it."""
    m = np.asarray(mask, dtype=bool)
    hits = np.flatnonzero(m)
    if len(hits) == 0:
        return None
    end = int(hits[-1]) + 1
    untrained_before = np.flatnonzero(~m[:end])
    start = int(untrained_before[-1]) + 1 if len(untrained_before) else 0
    return (start, end) if start > 0 else None


def prompt_cases(data: object, n: int, start: int = 0) -> list[PromptCase]:
    """The first ``n`` examples of ``data`` (``tokens(i)``/``mask(i)``/``len``) that have a prompt."""
    out: list[PromptCase] = []
    total = len(data)  # type: ignore[arg-type]
    for i in range(start, total):
        if len(out) >= n:
            break
        toks = np.asarray(data.tokens(i))  # type: ignore[attr-defined]
        span = last_turn(toks, data.mask(i))  # type: ignore[attr-defined]
        if span is None:
            continue
        a, b = span
        out.append(PromptCase(i, toks[:a].astype(np.int32), toks[a:b].astype(np.int32)))
    return out


def cut_at_stop(ids: Sequence[int], stop_ids: set[int]) -> list[int]:
    """Token ids up to (not including) the first stop id."""
    out = []
    for t in ids:
        if int(t) in stop_ids:
            break
        out.append(int(t))
    return out


def cut_text(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first stop string (e.g. an end-of-turn marker decoded as text)."""
    cut = len(text)
    for s in stop_strings:
        if s:
            k = text.find(s)
            if k >= 0:
                cut = min(cut, k)
    return text[:cut]


def end_of_turn(render: object) -> str:
    """The text a chat template puts after an assistant reply (e.g. ``<|im_end|>``), from a probe render.

    ``render(messages, add_generation_prompt=False) -> str`` is a :class:`ft.data.templates.ChatTemplate`
    ``render``. Returns "" when the template ends a turn with nothing recognisable.
    """
    reply = "\ue002probe reply\ue003"
    try:
        full = render(  # type: ignore[operator]
            [
                {"role": "user", "content": "\ue000probe question\ue001"},
                {"role": "assistant", "content": reply},
            ]
        )
    except Exception:  # a template that refuses the probe: rely on the tokenizer's EOS ids
        return ""
    k = full.find(reply)
    if k < 0:
        return ""
    tail = full[k + len(reply) :].strip()
    return tail
