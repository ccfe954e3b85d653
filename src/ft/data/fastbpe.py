"""A faster encoder for byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen 2 style), via tiktoken.

On a 2-core machine the Hugging Face tokenizer is most of the cost of preparing a dataset; for
byte-level BPE vocabularies tiktoken computes the same ids several times faster. It is used only
when the tokenizer's structure is one it reproduces (no normalizer, a byte-level pre-tokenizer with a
known regex, merges in rank order, no stripping added tokens), when it agrees with the Hugging Face
tokenizer on a probe text at build time, and it keeps being checked on a sample of real records
(see :func:`ft.data.tokenize.encode_examples`). Anything else uses the Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

# GPT-2's pre-tokenizer regex (what ByteLevel(use_regex=True) applies).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBE = (
    "Hello world! It's 2024-06-01, isn't it? I'll pay $1,234.56 for 3 items.\n\n"
    "def f(x):\n    return x**2  # comment\t\ttabs\r\n"
    "Ünïcödé façade naïve — “quotes” 日本語のテキスト 한국어 текст ελληνικά 🙂🚀👍🏽\n"
    '   leading spaces   and trailing   \n\n\n<b>tags</b> {"json": [1, 2, 3]} https://example.com/a?b=c\n'
    "CamelCaseWords snake_case_words SCREAMING_CASE 12345678901234567890 0.000001 1e-9\n"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character table used by byte-level BPE vocabularies."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _pattern(pre: dict[str, Any] | None) -> str | None:
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) != 2:
            return None
        split, byte = steps
        if (
            byte.get("type") != "ByteLevel"
            or byte.get("use_regex")
            or byte.get("add_prefix_space")
            or split.get("type") != "Split"
            or split.get("behavior") != "Isolated"
            or split.get("invert")
        ):
            return None
        return (split.get("pattern") or {}).get("Regex")
    return None


def lacking_bytes(spec: dict[str, Any]) -> list[int] | None:
    """Bytes that a byte-level BPE vocabulary has no token for (None: not a byte-level BPE vocabulary).

    Some vocabularies (e.g. SmolLM2's as stored in its GGUF) lack a few control characters. The
    Hugging Face tokenizer silently drops such a byte (BPE without an unknown token); tiktoken cannot
    encode it at all.
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    vocab = model.get("vocab") or {}
    table = _bytes_to_unicode()
    return [b for b in range(256) if table[b] not in vocab]


def _lead_range(b: int) -> tuple[int, int] | None:
    """The code points whose UTF-8 encoding starts with byte ``b`` (None: no character starts with it)."""
    if b < 0x80:
        return b, b
    for lo, hi, bits, shift in ((0xC2, 0xDF, 0x1F, 6), (0xE0, 0xEF, 0x0F, 12), (0xF0, 0xF4, 0x07, 18)):
        if lo <= b <= hi:
            first = (b & bits) << shift
            return first, min(first + (1 << shift) - 1, 0x10FFFF)
    return None  # 0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8


def lacking_pattern(missing: list[int] | None) -> re.Pattern[str] | None:
    """A regex matching every character whose UTF-8 bytes include one the vocabulary lacks.

    Raises ValueError for a missing continuation byte (0x80-0xBF), which too many characters hold.
    """
    ranges = []
    for b in missing or []:
        if 0x80 <= b <= 0xBF:
            raise ValueError(f"the vocabulary lacks the continuation byte 0x{b:02x}")
        r = _lead_range(b)
        if r is not None:
            lo, hi = r
            ranges.append(re.escape(chr(lo)) + ("" if hi == lo else "-" + re.escape(chr(hi))))
    return re.compile("[" + "".join(ranges) + "]") if ranges else None


class FastBPE:
    """tiktoken encoder equivalent to one Hugging Face byte-level BPE tokenizer, plus token byte lengths.

    ``lacking`` matches the characters the vocabulary has no token for: texts holding one must be
    encoded by the Hugging Face tokenizer (which drops the character), never by this encoder.
    """

    def __init__(self, encoding: Any, token_bytes: np.ndarray, lacking: re.Pattern[str] | None = None):
        self.encoding = encoding
        self.token_bytes = token_bytes  # byte length of every token id
        self.lacking = lacking
        self.threads = max(1, min(8, os.cpu_count() or 1))
        self._pool: Any = None

    @classmethod
    def build(cls, backend: Any) -> FastBPE | None:
        """The fast encoder for ``backend`` (a tokenizers.Tokenizer), or None when it cannot be exact."""
        try:
            import tiktoken
        except ImportError:
            return None
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # noqa: BLE001 - a tokenizer that cannot serialize is simply not sped up
            return None
        model = spec.get("model") or {}
        if (
            model.get("type") != "BPE"
            or model.get("dropout")
            or model.get("byte_fallback")
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
            or spec.get("normalizer")
        ):
            return None
        pattern = _pattern(spec.get("pre_tokenizer"))
        if pattern is None:
            return None
        added = spec.get("added_tokens") or []
        if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
            return None
        special = {t["content"]: int(t["id"]) for t in added}
        vocab: dict[str, int] = model.get("vocab") or {}
        try:
            lacking = lacking_pattern(lacking_bytes(spec))
        except ValueError:
            return None  # a missing byte inside many characters: not worth reproducing
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        for token, idx in vocab.items():
            if token in special:
                continue
            try:
                ranks[bytes(byte_of[c] for c in token)] = int(idx)
            except KeyError:
                return None  # not a byte-level vocabulary
        # tiktoken merges by rank: exact only when every merge's result ranks after the earlier ones.
        last = -1
        for m in model.get("merges") or []:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            r = vocab.get(a + b)
            if r is None or r <= last:
                return None
            last = r
        if len(set(ranks.values())) != len(ranks) or set(ranks.values()) & set(special.values()):
            return None
        try:
            enc = tiktoken.Encoding(
                "ft-fast-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
            )
        except Exception:  # noqa: BLE001 - e.g. a regex tiktoken's engine does not accept
            return None
        size = max([*ranks.values(), *special.values()]) + 1
        token_bytes = np.zeros(size, dtype=np.int64)
        for bts, idx in ranks.items():
            token_bytes[idx] = len(bts)
        for text, idx in special.items():
            token_bytes[idx] = len(text.encode("utf-8"))
        fast = cls(enc, token_bytes, lacking)
        probe = [PROBE, *special, "".join(special) + PROBE]
        if lacking is not None:
            probe = [lacking.sub("", p) for p in probe]
        if fast.encode_batch(probe) != [e.ids for e in backend.encode_batch(probe, add_special_tokens=False)]:
            return None
        return fast

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One contiguous chunk per thread (tiktoken's own encode_batch makes one future per text, whose
        # Python overhead is a large share of the work for short texts); encode() releases the GIL.
        encode = self.encoding.encode
        if self.threads == 1 or len(texts) < 64:
            return [encode(t, allowed_special="all") for t in texts]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ft-tokenize")
        step = -(-len(texts) // self.threads)
        parts = self._pool.map(
            lambda a: [encode(t, allowed_special="all") for t in texts[a : a + step]],
            range(0, len(texts), step),
        )
        return [ids for part in parts for ids in part]
