"""Tokenization with a loss mask: which tokens of each example the model is trained to predict.

The conversation is rendered once by the chat template, which also reports the character spans
of the trained assistant turns; the whole text is tokenized in one batch call to the fast (Rust)
tokenizer, and each span is mapped to token indices with the tokenizer's character alignment.
Tokenizing the whole text (rather than pieces) gives exactly the ids the model sees at inference.

``mask[t] == 1`` means token ``t`` is a training target (predicted from the tokens before it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ft.data.fastbpe import FastBPE, lacking_bytes, lacking_pattern
from ft.data.formats import Example
from ft.data.templates import ChatTemplate
from ft.data.validate import RecordError

TRAIN_ON_CHOICES = ("assistant", "last", "all")
VERIFY_EVERY = 64  # fast-path records compared with the Hugging Face tokenizer: one in this many
FAST_MIN_BATCH = 256  # smaller batches (small datasets) go straight to the Hugging Face tokenizer


class TextTokenizer:
    """The parts of a Hugging Face fast tokenizer that data preparation uses.

    Built from a ``transformers`` tokenizer (anything with ``backend_tokenizer``) or directly
    from a ``tokenizers.Tokenizer`` plus special-token strings and a chat template.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | list[dict[str, str]] | None = None,
        add_bos: bool = False,
        name: str = "tokenizer",
        hf: Any = None,
    ):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.name = name
        self.hf = hf
        self.use_fast = True
        self.fast: FastBPE | None | bool = False  # False = not built yet
        self.next_check = 0
        self._lacking: re.Pattern[str] | None | bool = False  # False = not computed yet

    @property
    def lacking(self) -> re.Pattern[str] | None:
        """Characters the vocabulary has no token for (the tokenizer drops them), as a regex; None if none."""
        if self._lacking is False:
            try:
                self._lacking = lacking_pattern(lacking_bytes(json.loads(self.backend.to_str())))
            except Exception:  # noqa: BLE001 - cannot serialize, or lacks a continuation byte: nothing known
                self._lacking = None
        return self._lacking if isinstance(self._lacking, re.Pattern) else None

    def fast_encoder(self) -> FastBPE | None:
        """The tiktoken-based encoder when it reproduces this tokenizer exactly (built on first use)."""
        if not self.use_fast:
            return None
        if self.fast is False:
            self.fast = FastBPE.build(self.backend)
        return self.fast if isinstance(self.fast, FastBPE) else None

    @classmethod
    def from_hf(cls, tok: Any, name: str | None = None) -> TextTokenizer:
        backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
        if backend is None:
            from ft.errors import ErrorCode, FtError

            raise FtError(
                ErrorCode.MODEL_UNSUPPORTED,
                f"{type(tok).__name__} is a slow (Python) tokenizer; ft needs a fast tokenizer (tokenizer.json)",
                "convert the tokenizer with transformers and save it, so the model folder has tokenizer.json",
            )
        add_bos = False
        bos_id = getattr(tok, "bos_token_id", None)
        if bos_id is not None:
            try:
                add_bos = list(tok("a").input_ids[:1]) == [bos_id]
            except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "a" is caught later
                add_bos = False
        return cls(
            backend,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            chat_template=getattr(tok, "chat_template", None),
            add_bos=add_bos,
            name=name or getattr(tok, "name_or_path", "") or "tokenizer",
            hf=tok,
        )

    @property
    def special(self) -> dict[str, str | None]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token}

    def fingerprint(self) -> str:
        """Changes whenever tokenization could change (vocabulary, merges, special tokens, template)."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(repr((self.bos_token, self.eos_token, self.add_bos, self.chat_template)).encode())
        return h.hexdigest()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)


@dataclass(slots=True)
class Encoded:
    ids: np.ndarray  # int32
    mask: np.ndarray  # bool
    dropped: str = ""  # characters of the text the vocabulary lacks (dropped, as the model's tokenizer does)


def _first_token_from(enc: Any, pos: int, n_chars: int, n_tokens: int) -> int:
    """Index of the first token whose text starts at or after character ``pos``.

    A token is trained when its first character lies inside a trained span; tokens that only
    cover whitespace dropped from the alignment (trimmed offsets) are skipped forward.
    """
    while pos < n_chars:
        t = enc.char_to_token(pos)
        if t is not None:
            start = enc.token_to_chars(t)[0]
            return t if start >= pos else t + 1
        pos += 1
    return n_tokens


def encode_examples(
    examples: Sequence[Example],
    tok: TextTokenizer,
    template: ChatTemplate | None,
    train_on: str = "assistant",
) -> list[Encoded | RecordError]:
    """Tokenize a batch of examples; a record the template refuses comes back as its RecordError."""
    return start_encoding(examples, tok, template, train_on)()


def start_encoding(
    examples: Sequence[Example],
    tok: TextTokenizer,
    template: ChatTemplate | None,
    train_on: str = "assistant",
    executor: Executor | None = None,
) -> Callable[[], list[Encoded | RecordError]]:
    """Render now; tokenize on ``executor`` (if given) while the caller reads the next batch.

    Returns a function that waits for the tokens and computes the masks. The Rust tokenizers release
    the GIL, so on two cores reading and validating batch k+1 overlaps tokenizing batch k.
    """
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    slots: list[int] = []
    out: list[Encoded | RecordError] = [None] * len(examples)  # type: ignore[list-item]
    for i, ex in enumerate(examples):
        try:
            if ex.messages is None:
                # Plain text: the tokenizer's own framing (BOS if it adds one), then EOS so it learns to stop.
                bos = (tok.bos_token or "") if tok.add_bos else ""
                text = bos + (ex.text or "") + (tok.eos_token or "")
                span = [(0, len(text))]
            else:
                assert template is not None
                text, span = template.spans(ex.messages, train_on, ex.tools)
        except RecordError as e:
            out[i] = e
            continue
        texts.append(text)
        spans.append(span)
        slots.append(i)
    # Building the fast encoder costs a fraction of a second: only worth it for real batches.
    fast = tok.fast_encoder() if len(texts) >= FAST_MIN_BATCH else None
    # Characters the vocabulary lacks: the Hugging Face tokenizer drops them; tiktoken cannot encode
    # them, so texts holding one go to the Hugging Face tokenizer.
    lacking = tok.lacking
    slow: list[int] = []  # positions in texts for the Hugging Face tokenizer
    dropped: dict[int, str] = {}
    if lacking is not None:
        for j, text in enumerate(texts):
            if lacking.search(text):
                dropped[slots[j]] = "".join(sorted(set(lacking.findall(text))))
                slow.append(j)
    if fast is None:
        slow, quick = list(range(len(texts))), []
    else:
        taken = set(slow)
        quick = [j for j in range(len(texts)) if j not in taken]
    slow_texts = [texts[j] for j in slow]
    quick_texts = [texts[j] for j in quick]

    def work() -> tuple[list[Any], list[Any]]:
        a = fast.encode_batch(quick_texts) if fast is not None and quick_texts else []
        b = tok.backend.encode_batch(slow_texts, add_special_tokens=False) if slow_texts else []
        return a, b

    future = executor.submit(work) if executor is not None else None

    def finish() -> list[Encoded | RecordError]:
        quick_ids, slow_enc = future.result() if future is not None else work()
        if quick:
            assert fast is not None
            _masks_fast(
                fast,
                tok,
                quick_texts,
                [spans[j] for j in quick],
                [slots[j] for j in quick],
                out,
                quick_ids,
            )
        if slow:
            _masks_offsets(slow_texts, [spans[j] for j in slow], [slots[j] for j in slow], out, slow_enc)
        for slot, chars in dropped.items():
            enc = out[slot]
            if isinstance(enc, Encoded):
                enc.dropped = chars
        return out

    return finish


def _masks_offsets(
    texts: list[str],
    spans: list[list[tuple[int, int]]],
    slots: list[int],
    out: list[Encoded | RecordError],
    encodings: list[Any],
) -> None:
    for slot, text, span, enc in zip(slots, texts, spans, encodings, strict=True):
        ids = np.array(enc.ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=np.bool_)
        n_chars = len(text)
        for s, e in span:
            a = _first_token_from(enc, s, n_chars, len(ids))
            b = _first_token_from(enc, e, n_chars, len(ids))
            mask[a:b] = True
        out[slot] = Encoded(ids, mask)


class FastPathMismatch(Exception):
    """The fast encoder disagreed with the Hugging Face tokenizer on a sampled record."""


def _byte_pos(text: str, pos: int) -> int:
    return pos if text.isascii() else len(text[:pos].encode("utf-8"))


def _masks_fast(
    fast: FastBPE,
    tok: TextTokenizer,
    texts: list[str],
    spans: list[list[tuple[int, int]]],
    slots: list[int],
    out: list[Encoded | RecordError],
    all_ids: list[list[int]],
) -> None:
    """Same result as the Hugging Face path: ids from tiktoken, mask from token byte offsets."""
    # Keep checking against the reference tokenizer on a sample of real records.
    for j in range(tok.next_check, len(texts), VERIFY_EVERY):
        if all_ids[j] != tok.backend.encode(texts[j], add_special_tokens=False).ids:
            tok.fast = None
            raise FastPathMismatch(texts[j][:200])
    tok.next_check = (tok.next_check - len(texts)) % VERIFY_EVERY
    # The whole batch as one array: token byte offsets, span ends and the mask in a few vector operations.
    counts = np.fromiter((len(x) for x in all_ids), dtype=np.int64, count=len(all_ids))
    flat = np.fromiter(itertools.chain.from_iterable(all_ids), dtype=np.int32, count=int(counts.sum()))
    sizes = fast.token_bytes[flat]
    starts = np.cumsum(sizes) - sizes  # byte offset of each token in the concatenated texts
    bounds = np.concatenate([[0], np.cumsum(counts)])
    text_base = np.append(starts, starts[-1] + sizes[-1] if len(flat) else 0)[bounds[:-1]].tolist()
    lo_bytes: list[int] = []
    hi_bytes: list[int] = []
    for base, text, span in zip(text_base, texts, spans, strict=True):
        ascii_text = text.isascii()
        for s, e in span:
            lo_bytes.append(base + (s if ascii_text else _byte_pos(text, s)))
            hi_bytes.append(base + (e if ascii_text else _byte_pos(text, e)))
    # A token is trained when its first byte lies inside a span (as in the offsets path).
    edges = np.zeros(len(flat) + 1, dtype=np.int32)
    np.add.at(edges, np.searchsorted(starts, lo_bytes, side="left"), 1)
    np.add.at(edges, np.searchsorted(starts, hi_bytes, side="left"), -1)
    mask = np.cumsum(edges[:-1]) > 0
    for k, slot in enumerate(slots):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        out[slot] = Encoded(flat[lo:hi], mask[lo:hi])
