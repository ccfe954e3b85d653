"""A model folder's tokenizer as GGUF metadata, the way llama.cpp tokenizes with it.

Two tokenizer families are written:

* ``gpt2``: byte-level BPE (SmolLM2, Llama 3, Qwen2). llama.cpp re-implements the pre-tokenizer
  (the regex that splits text before BPE) by name (``tokenizer.ggml.pre``), so the name is read off
  the structure of ``tokenizer.json``'s pre-tokenizer; one we cannot name is refused rather than
  written wrongly.
* ``llama``: SentencePiece BPE with byte fallback (Llama 2, Mistral). llama.cpp merges the pair
  whose merged piece has the highest *score*; scores come from ``tokenizer.model`` when the folder
  has it, else from the merge ranks of ``tokenizer.json`` (rank r -> score -r: same order).

Special token ids, add-BOS/EOS flags, merges and the chat template come from the gguf package's
own ``SpecialVocab`` (what llama.cpp's converter uses), so they mean what llama.cpp expects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.errors import ErrorCode, FtError

# Hugging Face pre-tokenizer regexes of known byte-level BPE families -> llama.cpp pre-tokenizer names.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class GgufVocab:
    """Everything ``tokenizer.ggml.*`` that is not handled by gguf.SpecialVocab."""

    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FtError(ErrorCode.MODEL_INVALID, f"cannot read {path}: {e}") from e


def _pieces(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for sub in node.get("pretokenizers") or node.get("normalizers") or []:
            out.extend(_pieces(sub))
        return out
    return [node]


def _split_regex(piece: dict[str, Any]) -> str | None:
    pattern = piece.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def bpe_pre_tokenizer(tok: dict[str, Any], source: Path) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE ``tokenizer.json``, or FtError."""
    pieces = _pieces(tok.get("pre_tokenizer"))
    shape = [p.get("type") for p in pieces]
    normalizer = _pieces(tok.get("normalizer"))
    if any(n.get("type") not in ("NFC",) for n in normalizer):
        what = ", ".join(str(n.get("type")) for n in normalizer)
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{source}: the tokenizer normalizes text ({what}) in a way llama.cpp's BPE tokenizer does not",
            "export with --format mlx or --format hf instead",
        )
    byte_level = pieces[-1] if pieces and shape[-1] == "ByteLevel" else None
    if byte_level is not None and byte_level.get("add_prefix_space"):
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{source}: the tokenizer adds a space before the text (ByteLevel add_prefix_space), "
            "which llama.cpp's BPE tokenizer does not do",
            "export with --format mlx or --format hf instead",
        )
    if shape == ["ByteLevel"] and byte_level and byte_level.get("use_regex", True):
        return "gpt-2"
    if (
        shape == ["Digits", "ByteLevel"]
        and pieces[0].get("individual_digits")
        and byte_level
        and byte_level.get("use_regex", True)
    ):
        return "smollm"  # the GPT-2 regex after splitting every digit (SmolLM, StarCoder)
    if shape == ["Split", "ByteLevel"] and byte_level and not byte_level.get("use_regex", True):
        name = _SPLIT_PRE.get(_split_regex(pieces[0]) or "")
        if name:
            return name
    raise FtError(
        ErrorCode.MODEL_UNSUPPORTED,
        f"{source}: llama.cpp has no pre-tokenizer known to match this tokenizer's ({' + '.join(map(str, shape)) or 'none'})",
        "ft writes GGUF tokenizers it can name exactly (gpt-2, smollm, llama-bpe, qwen2, SentencePiece); "
        "export with --format mlx or --format hf instead",
    )


def _is_sentencepiece_bpe(tok: dict[str, Any]) -> bool:
    model = tok.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _spm_space_prefix(tok: dict[str, Any]) -> bool:
    for n in _pieces(tok.get("normalizer")):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for p in _pieces(tok.get("pre_tokenizer")):
        if p.get("type") == "Metaspace":
            scheme = p.get("prepend_scheme")
            if scheme is None:
                return bool(p.get("add_prefix_space", True))
            return scheme in ("first", "always")
    return False


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            a, _, b = m.partition(" ")
        else:
            a, b = m
        out.append((a, b))
    return out


def _spm_scores(folder: Path, tok: dict[str, Any], tokens: list[str]) -> tuple[list[float], str]:
    spm = folder / "tokenizer.model"
    if spm.is_file():
        try:
            import sentencepiece

            proc = sentencepiece.SentencePieceProcessor(model_file=str(spm))
            n = proc.get_piece_size()
            if all(proc.id_to_piece(i) == tokens[i] for i in range(min(n, len(tokens)))):
                return [
                    float(proc.get_score(i)) if i < n else 0.0 for i in range(len(tokens))
                ], "tokenizer.model"
        except ImportError:
            pass
    # Without the SentencePiece file: llama.cpp merges by highest score, Hugging Face BPE by lowest
    # merge rank, so a piece's score is minus the rank of the first merge that makes it.
    index = {t: i for i, t in enumerate(tokens)}
    scores = [0.0] * len(tokens)
    seen: set[int] = set()
    for rank, (a, b) in enumerate(_merge_pairs(tok.get("model") or {})):
        i = index.get(a + b)
        if i is not None and i not in seen:
            seen.add(i)
            scores[i] = -float(rank + 1)
    return scores, "merge ranks of tokenizer.json"


def check_tokenizer(folder: Path) -> None:
    """FtError when the tokenizer in ``folder`` cannot be written to GGUF (structure only, no vocabulary)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FtError(ErrorCode.MODEL_INVALID, f"{folder} has no tokenizer.json; GGUF export needs it")
    tok = _read_json(path)
    model_type = (tok.get("model") or {}).get("type")
    if model_type != "BPE":
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{path}: tokenizer model {model_type!r} cannot be written to GGUF by ft (BPE only)",
        )
    if not _is_sentencepiece_bpe(tok):
        bpe_pre_tokenizer(tok, path)


def read_vocab(folder: Path, vocab_size: int) -> GgufVocab:
    """The GGUF vocabulary for the tokenizer in ``folder`` (tokenizer.json), padded to ``vocab_size``."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{folder} has no tokenizer.json; GGUF export needs the fast tokenizer file",
            "re-pull the model (ft models pull) so its tokenizer files are present",
        )
    tok = _read_json(path)
    backend = Tokenizer.from_file(str(path))
    n = backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{path}: the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows",
        )
    added = {a["id"]: a for a in tok.get("added_tokens") or []}
    model_type = (tok.get("model") or {}).get("type")
    spm = _is_sentencepiece_bpe(tok)
    if model_type != "BPE":
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{path}: tokenizer model {model_type!r} cannot be written to GGUF by ft (BPE only)",
            "export with --format mlx or --format hf instead",
        )
    unk = (tok.get("model") or {}).get("unk_token")
    if unk is None and (folder / "tokenizer_config.json").is_file():
        value = _read_json(folder / "tokenizer_config.json").get("unk_token")
        unk = value.get("content") if isinstance(value, dict) else value
    tokens: list[str] = []
    types: list[int] = []
    pads = 0
    for i in range(vocab_size):
        text = backend.id_to_token(i)
        if text is None:  # the embedding is padded beyond the tokenizer (common for GPU-friendly sizes)
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
            pads += 1
            continue
        tokens.append(text)
        if spm and text == unk:
            types.append(2)  # UNKNOWN
        elif i in added:
            types.append(3 if added[i].get("special") else 4)  # CONTROL / USER_DEFINED
        elif spm and _BYTE_TOKEN.match(text):
            types.append(6)  # BYTE
        else:
            types.append(1)  # NORMAL
    vocab = GgufVocab(model="llama" if spm else "gpt2", pre=None, tokens=tokens, token_types=types)
    if pads:
        vocab.notes.append(f"{pads} embedding rows without a token written as unused [PAD] tokens")
    if spm:
        vocab.pre = "default"
        vocab.scores, source = _spm_scores(folder, tok, tokens)
        vocab.add_space_prefix = _spm_space_prefix(tok)
        vocab.notes.append(f"SentencePiece scores from {source}")
    else:
        vocab.pre = bpe_pre_tokenizer(tok, path)
    return vocab


def chat_template(folder: Path) -> str | None:
    """The chat template a model folder carries (tokenizer_config.json, or chat_template.jinja/json)."""
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        value = _read_json(cfg).get("chat_template")
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # named templates: the default one
            for item in value:
                if isinstance(item, dict) and item.get("name") == "default":
                    return item.get("template")
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        value = _read_json(folder / "chat_template.json").get("chat_template")
        return value if isinstance(value, str) else None
    return None
