"""Readers: turn a SOURCE (file, folder or Hugging Face dataset) into raw records with locations.

A reader never raises on a bad record: it yields a :class:`RawRecord` carrying the problem
(invalid JSON, bad encoding, ...) and the file and line (or row) it came from, and goes on.
JSONL, CSV and Parquet stream with bounded memory; a JSON file is read whole (it is one value).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import json
import lzma
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ft.data.validate import Reason, location
from ft.errors import ErrorCode, FtError
from ft.workspace.atomic import sha256_file

# Compressed text files: suffix -> (name, opener, the command that tests such a file).
COMPRESSIONS: dict[str, tuple[str, Callable[[Path], Any], str]] = {
    ".gz": ("gzip", lambda p: gzip.open(p, "rb"), "gzip -t"),
    ".bz2": ("bzip2", lambda p: bz2.open(p, "rb"), "bzip2 -t"),
    ".xz": ("xz", lambda p: lzma.open(p, "rb"), "xz -t"),
}
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_BOM = b"\xef\xbb\xbf"
_HF_ID = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HF_PREFIX = "hf:"
# Split names of files (mlx-lm's train/valid/test.jsonl) and of a saved DatasetDict -> ft's splits.
SPLIT_ALIASES = {
    "train": "train",
    "valid": "val",
    "validation": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
}


@dataclass(slots=True)
class RawRecord:
    """One record as read: the parsed object, or the reason it could not be read, and where it was."""

    source: str
    line: int
    obj: Any = None
    error: tuple[Reason, str] | None = None
    raw: str | None = None  # the text of the record when it could not be parsed (for --show-content)
    unit: str = "line"


def _ignore(*_: Any) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ReadHooks:
    """What a reader reports as it goes, to whoever shows progress and counts: both optional."""

    bytes_read: Callable[[int], None] = _ignore
    """Bytes of the file consumed so far (called with each increment)."""
    blank: Callable[[], None] = _ignore
    """Called once per blank line (or empty CSV row) skipped."""


@dataclass
class SourceFile:
    path: Path
    kind: str  # jsonl | json | csv | parquet | hf (one split of a folder saved by datasets' save_to_disk)
    display: str
    size: int
    split: str | None = None  # the ft split (train/val/test) its records go to, when the source gives splits
    hf_split: str | None = None  # kind hf: the split's name in the saved DatasetDict


@dataclass
class Source:
    """What ``prepare`` reads: local files, or one Hugging Face dataset split."""

    spec: str
    files: list[SourceFile] = field(default_factory=list)
    hf: dict[str, Any] | None = None  # {"path": ..., "name": ..., "split": ...}
    units: dict[int, str] = field(default_factory=dict)
    """How each file's records are numbered (file index -> line, row or index), known once read."""
    ignored: list[str] = field(default_factory=list)
    """Parts of the source left out (splits of a saved DatasetDict that map to no ft split)."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def given_splits(self) -> bool:
        """True when the source says which split every record belongs to (train/valid/test files)."""
        return bool(self.files) and all(f.split for f in self.files)

    def identity(self, progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """What makes this source this source: sha256 of every file (or the HF dataset fingerprint)."""
        if self.hf is not None:
            ds = _load_hf(self.hf)
            return [{**self.hf, "fingerprint": getattr(ds, "_fingerprint", None), "rows": len(ds)}]
        out: list[dict[str, Any]] = []
        for f in self.files:
            if f.kind == "hf":
                ds = _load_hf(_disk_part(f))
                entry: dict[str, Any] = {
                    "path": str(f.path),
                    "display": f.display,
                    "split_name": f.hf_split,
                    "fingerprint": getattr(ds, "_fingerprint", None),
                    "rows": len(ds),
                }
            else:
                entry = {
                    "path": str(f.path),
                    "display": f.display,
                    "bytes": f.size,
                    "sha256": sha256_file(f.path, progress),
                }
            if f.split:
                entry["split"] = f.split
            out.append(entry)
        return out

    def records(self, hooks: ReadHooks | None = None) -> Iterator[tuple[int, RawRecord]]:
        """(file index, record) for every record of every file, in order; progress and blanks go to ``hooks``."""
        if self.hf is not None:
            for rec in _read_hf(self.hf, self.spec):
                yield 0, rec
            return
        for i, f in enumerate(self.files):
            if f.kind == "hf":
                records = _read_hf(_disk_part(f), f.display)
            else:
                records = READERS[f.kind](f.path, f.display, hooks or ReadHooks())
            for rec in records:
                self.units[i] = rec.unit
                yield i, rec


def _kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return SUFFIXES.get(suffixes[-1]) if suffixes else None


def _split_of(p: Path) -> str | None:
    """The ft split a file named like mlx-lm's ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl`` holds."""
    return SPLIT_ALIASES.get(p.name.split(".", 1)[0].lower())


def _disk_part(f: SourceFile) -> dict[str, Any]:
    return {"path": str(f.path), "name": None, "split": f.hf_split, "from_disk": True}


def _saved_dataset(path: Path, text: str, hf_split: str | None) -> Source | None:
    """A folder written by datasets' ``save_to_disk``: a Dataset, or a DatasetDict (its splits as given)."""
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():  # a Dataset
        return Source(
            text, hf={"path": str(path.resolve()), "name": None, "split": hf_split, "from_disk": True}
        )
    if not (path / "dataset_dict.json").is_file():
        return None
    if hf_split is not None:  # one split asked for: split it like any other source
        return Source(
            text, hf={"path": str(path.resolve()), "name": None, "split": hf_split, "from_disk": True}
        )
    try:
        names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        names = [p.name for p in sorted(path.iterdir()) if (p / "state.json").is_file()]
    files, ignored = [], []
    for split_name in names:
        part = path / split_name
        target = SPLIT_ALIASES.get(str(split_name).lower())
        if target is None:
            ignored.append(str(split_name))
            continue
        size = sum(f.stat().st_size for f in part.glob("*.arrow"))
        files.append(SourceFile(path.resolve(), "hf", f"{path.name}[{split_name}]", size, target, split_name))
    if not any(f.split == "train" for f in files):
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"{path}: the saved DatasetDict has no train split (splits: {', '.join(map(str, names))})",
            "name the split to use with --hf-split (ft then splits it into train/val itself)",
        )
    if not any(f.split != "train" for f in files):
        # Only a train split: ft makes the validation split itself.
        return Source(
            text, hf={"path": str(path.resolve()), "name": None, "split": "train", "from_disk": True}
        )
    return Source(text, files=files, ignored=ignored)


def open_source(
    spec: str | Path,
    *,
    base: Path | None = None,
    hf_split: str | None = None,
    hf_name: str | None = None,
) -> Source:
    """Resolve SOURCE: a file, a folder of data files, a saved HF dataset folder, or a HF dataset id.

    ``hf_split`` None: a hub dataset's train split; every split of a saved DatasetDict, as given.
    A folder of mlx-lm's layout (``train.jsonl`` with ``valid.jsonl`` and/or ``test.jsonl``) and a
    saved DatasetDict keep their splits (``Source.given_splits``).
    """
    text = str(spec)
    if text.startswith(HF_PREFIX):
        hf_path = _hf_path(text[len(HF_PREFIX) :], base)
        if Path(hf_path).is_dir():
            saved = _saved_dataset(Path(hf_path), text, hf_split)
            if saved is not None:
                return saved
        return Source(text, hf={"path": hf_path, "name": hf_name, "split": hf_split or "train"})
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_file():
        kind = _kind(path)
        if kind is None:
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"{path}: unknown data file type {''.join(path.suffixes) or '(no extension)'}",
                "use .jsonl, .json, .csv or .parquet (optionally .gz, .bz2 or .xz for the text ones)",
            )
        if kind == "parquet" and path.suffix.lower() in COMPRESSIONS:
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"{path}: compressed Parquet ({path.suffix}) is not supported",
                "decompress it (Parquet compresses its columns itself)",
            )
        return Source(text, files=[SourceFile(path, kind, path.name, path.stat().st_size)])
    if path.is_dir():
        saved = _saved_dataset(path, text, hf_split)
        if saved is not None:
            return saved
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and _kind(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"{path}: the folder holds no data files",
                "put .jsonl, .json, .csv or .parquet files in it",
            )
        found = [SourceFile(p, _kind(p) or "", str(p.relative_to(path)), p.stat().st_size) for p in files]
        splits = {_split_of(f.path) if f.path.parent == path else None for f in found}
        if None not in splits and "train" in splits and len(splits) > 1:
            # mlx-lm's layout (train.jsonl, valid.jsonl, test.jsonl): the given splits are kept.
            for f in found:
                f.split = _split_of(f.path)
        return Source(text, files=found)
    if _HF_ID.match(text) and Path(text).suffix.lower() not in SUFFIXES:
        return Source(text, hf={"path": text, "name": hf_name, "split": hf_split or "train"})
    raise FtError(
        ErrorCode.NOT_FOUND,
        f"{path}: no such file or folder",
        "check the path (relative paths are taken from the workspace), or use hf:OWNER/NAME for a Hugging Face dataset",
    )


def _hf_path(rest: str, base: Path | None) -> str:
    p = Path(rest).expanduser()
    if not p.is_absolute() and base is not None and (base / p).exists():
        return str((base / p).resolve())
    return str(p.resolve()) if p.exists() else rest


# ------------------------------------------------------------------------------------------- JSONL
class _Decompressing:
    """A compressed file read line by line or whole; broken compressed data becomes a clear FtError.

    Without this, a truncated gzip file raises EOFError (which click reports as "interrupted", exit
    130) and a corrupt one zlib.error or BadGzipFile (an "internal error").
    """

    def __init__(self, path: Path, suffix: str):
        self.path = path
        self.kind, opener, self.check = COMPRESSIONS[suffix]
        self.fh = opener(path)
        self.lines = 0

    def __enter__(self) -> _Decompressing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def close(self) -> None:
        self.fh.close()

    def _fail(self, e: BaseException) -> FtError:
        where = f" after {self.lines:,} lines" if self.lines else ""
        if isinstance(e, EOFError):
            what = (
                f"the {self.kind} data ends early{where}: the file is truncated "
                "(cut off, e.g. by an interrupted download or copy)"
            )
            hint = f"get the complete file again; `{self.check} {self.path.name}` checks it"
        else:
            what = f"not valid {self.kind} data{where} ({e})"
            hint = (
                f"`{self.check} {self.path.name}` checks the file; recompress it, or drop the "
                f"{self.path.suffix} suffix if the file is not compressed"
            )
        return FtError(ErrorCode.BAD_COMPRESSION, f"{self.path}: {what}", hint)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for line in self.fh:
                self.lines += 1
                yield line
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise self._fail(e) from None

    def read(self, n: int = -1) -> bytes:
        try:
            return self.fh.read(n)
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise self._fail(e) from None

    def seek(self, pos: int) -> None:
        self.fh.seek(pos)


# Text in another Unicode encoding than UTF-8: its byte order mark, or the NUL bytes of ASCII text.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


def _sniff(head: bytes) -> tuple[str, str] | None:
    """(codec, name) of a UTF-16/UTF-32 text (with or without a byte order mark), else None (UTF-8)."""
    for bom, codec, name in _WIDE_BOMS:
        if head.startswith(bom):
            return codec, name
    if len(head) >= 4 and head[0] and not head[1] and not head[2] and not head[3]:
        return "utf-32-le", "UTF-32"
    if len(head) >= 4 and not head[0] and not head[1] and not head[2] and head[3]:
        return "utf-32-be", "UTF-32"
    if len(head) >= 2 and head[0] and not head[1] and head[0] < 0x80:
        return "utf-16-le", "UTF-16"
    if len(head) >= 2 and not head[0] and head[1] and head[1] < 0x80:
        return "utf-16-be", "UTF-16"
    return None


class _Recoded:
    """A UTF-16 or UTF-32 file read as UTF-8 bytes (lines or whole), so every reader handles it alike."""

    def __init__(self, raw: Any, path: Path, codec: str, name: str):
        self.raw, self.path, self.codec, self.name = raw, path, codec, name

    def __enter__(self) -> _Recoded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()

    def _texts(self) -> Iterator[str]:
        dec = codecs.getincrementaldecoder(self.codec)("strict")
        done = 0
        while True:
            chunk = self.raw.read(1 << 16)
            try:
                yield dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise FtError(
                    ErrorCode.DATA_INVALID,
                    f"{self.path}: read as {self.name} (its first bytes say so), but the bytes near byte "
                    f"{done + e.start:,} are not valid {self.name}: {e.reason}",
                    "save the file as UTF-8 (or as valid " + self.name + ")",
                ) from None
            done += len(chunk)
            if not chunk:
                return

    def __iter__(self) -> Iterator[bytes]:
        rest = ""
        for text in self._texts():
            lines = (rest + text).split("\n")
            rest = lines.pop()
            for line in lines:
                yield (line + "\n").encode("utf-8", "surrogatepass")
        if rest:
            yield rest.encode("utf-8", "surrogatepass")

    def read(self) -> bytes:
        return "".join(self._texts()).encode("utf-8", "surrogatepass")


def _open_binary(path: Path) -> Any:
    """The file's bytes as UTF-8, iterable by line or read whole.

    Decompresses .gz, .bz2 and .xz; a UTF-16 or UTF-32 text (byte order mark, or the NUL bytes of
    ASCII characters) is decoded as such and handed on as UTF-8.
    """
    suffix = path.suffix.lower()
    raw = _Decompressing(path, suffix) if suffix in COMPRESSIONS else open(path, "rb")  # noqa: SIM115
    try:
        head = raw.read(4)
        raw.seek(0)
    except BaseException:
        raw.close()
        raise
    wide = _sniff(head)
    return _Recoded(raw, path, *wide) if wide else raw


def _decode(line: bytes) -> tuple[str | None, str | None]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line"


def read_jsonl(path: Path, display: str, hooks: ReadHooks) -> Iterator[RawRecord]:
    """One JSON object per line; blank lines skipped; a UTF-8 BOM on the first line is fine."""
    with _open_binary(path) as fh:
        for lineno, line in enumerate(fh, 1):
            hooks.bytes_read(len(line))
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            if not line.strip():
                hooks.blank()
                continue
            text, err = _decode(line)
            if text is None:
                yield RawRecord(
                    display,
                    lineno,
                    error=(Reason.BAD_ENCODING, err or ""),
                    raw=line.decode("utf-8", "replace").rstrip("\r\n"),
                )
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                yield RawRecord(
                    display, lineno, error=(Reason.INVALID_JSON, _json_msg(e)), raw=text.rstrip("\r\n")
                )
                continue
            yield RawRecord(display, lineno, obj=obj)


def _json_msg(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} (column {e.colno})"
    return f"invalid JSON: {e}"


# -------------------------------------------------------------------------------------------- JSON
_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\udc80-\udcff]")
_RECORD_KEYS = {"messages", "conversations", "instruction", "output", "prompt", "completion", "text"}


class _Scanner:
    """Walks a JSON document keeping track of line numbers, so each array element gets its own."""

    def __init__(self, text: str):
        self.text = text
        self.dec = json.JSONDecoder()
        self.pos = 0
        self.error_pos = 0  # where the last broken value stopped parsing
        self._line = 1
        self._line_pos = 0

    def line_at(self, pos: int) -> int:
        if pos < self._line_pos:  # never happens in forward scans; kept correct anyway
            self._line, self._line_pos = 1, 0
        self._line += self.text.count("\n", self._line_pos, pos)
        self._line_pos = pos
        return self._line

    def ws(self) -> None:
        self.pos = _WS.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def peek(self) -> str:
        self.ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def value(self) -> tuple[Any, int, int]:
        start = self.pos
        obj, end = self.dec.raw_decode(self.text, self.pos)
        self.pos = end
        return obj, start, end


def read_json(path: Path, display: str, hooks: ReadHooks) -> Iterator[RawRecord]:
    """A JSON array of records, an object of arrays (e.g. {"train": [...]}, or columns), or one record."""
    with _open_binary(path) as fh:
        data = fh.read()
    hooks.bytes_read(path.stat().st_size)
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    # surrogateescape keeps going past invalid bytes; each record whose text holds one is rejected.
    text = data.decode("utf-8", "surrogateescape")
    sc = _Scanner(text)
    first = sc.peek()
    if first in ("[", "{"):
        records = list(_json_array(sc, display) if first == "[" else _json_object(sc, display))
        lines = [r.line for r in records if r.unit == "line"]
        if len(set(lines)) < len(lines):
            # Records share lines (a one-line array): number them by position in the file instead.
            for i, r in enumerate(records):
                r.line, r.unit = i, "index"
        yield from records
    elif first == "":
        return
    else:
        yield RawRecord(
            display,
            sc.line_at(sc.pos),
            error=(
                Reason.INVALID_JSON,
                "a .json file must hold an array of records or an object; use .jsonl for one record a line",
            ),
        )


def _element(sc: _Scanner, display: str) -> RawRecord:
    line = sc.line_at(sc.pos)
    try:
        obj, start, end = sc.value()
    except ValueError as e:
        sc.error_pos = getattr(e, "pos", sc.pos)
        return RawRecord(display, line, error=(Reason.INVALID_JSON, _json_msg(e)))
    if _SURROGATE.search(sc.text, start, end):
        return RawRecord(
            display, line, error=(Reason.BAD_ENCODING, "the record holds bytes that are not valid UTF-8")
        )
    return RawRecord(display, line, obj=obj)


def _json_array(sc: _Scanner, display: str, stop: str = "]") -> Iterator[RawRecord]:
    sc.pos += 1  # '['
    while True:
        c = sc.peek()
        if c == "]":
            sc.pos += 1
            return
        if c == "":
            yield RawRecord(
                display,
                sc.line_at(sc.pos),
                error=(Reason.INVALID_JSON, "the array is not closed (missing ']')"),
            )
            return
        rec = _element(sc, display)
        yield rec
        if rec.error and rec.error[0] is Reason.INVALID_JSON:
            at = sc.error_pos
            if not _resync(sc):
                yield from _unread_rest(sc, display, at)
                return
            continue
        c = sc.peek()
        if c == ",":
            sc.pos += 1
        elif c != "]":
            yield RawRecord(
                display, sc.line_at(sc.pos), error=(Reason.INVALID_JSON, "expected ',' or ']' after a record")
            )
            at = sc.pos
            if not _resync(sc):
                yield from _unread_rest(sc, display, at)
                return


def _unread_rest(sc: _Scanner, display: str, at: int) -> Iterator[RawRecord]:
    """After a broken record with no line break to resume at (e.g. a one-line array), say what was lost."""
    rest = sc.text[max(at, sc.error_pos) :]
    if "{" in rest:
        yield RawRecord(
            display,
            sc.line_at(at),
            error=(
                Reason.INVALID_JSON,
                f"the {len(rest):,} characters after the broken record before could not be split into records "
                "(no line break to resume at) and were not read; fix the broken record",
            ),
        )


def _resync(sc: _Scanner) -> bool:
    """After a broken element, skip to the next line that starts a new object; False at the end."""
    text = sc.text
    while True:
        nl = text.find("\n", sc.pos)
        if nl < 0:
            return False
        sc.pos = nl + 1
        c = sc.peek()
        if c == ",":
            sc.pos += 1
            c = sc.peek()
        if c == "{":
            return True
        if c in ("]", ""):
            return c == "]"


def _json_object(sc: _Scanner, display: str) -> Iterator[RawRecord]:
    start = sc.pos
    line = sc.line_at(start)
    try:
        whole, _, end = sc.value()
    except ValueError as e:
        yield RawRecord(display, line, error=(Reason.INVALID_JSON, _json_msg(e)))
        return
    all_lists = bool(whole) and all(isinstance(v, list) for v in whole.values())
    columns = all_lists and not any(isinstance(x, dict) for v in whole.values() for x in v)
    if not columns and (_RECORD_KEYS & set(whole) or not all_lists):
        # A single record in a .json file.
        if _SURROGATE.search(sc.text, start, end):
            yield RawRecord(
                display, line, error=(Reason.BAD_ENCODING, "the record holds bytes that are not valid UTF-8")
            )
        else:
            yield RawRecord(display, line, obj=whole)
        return
    lists = list(whole.values())
    if not columns and all(isinstance(x, dict) for v in lists for x in v):
        # Object of arrays of records ({"train": [...], "test": [...]}): re-scan for line numbers.
        sc.pos = start + 1
        while True:
            c = sc.peek()
            if c in ("}", ""):
                return
            sc.value()  # key
            sc.peek()
            sc.pos += 1  # ':'
            if sc.peek() == "[":
                yield from _json_array(sc, display)
            if sc.peek() == ",":
                sc.pos += 1
        return
    # Columns: {"prompt": [...], "completion": [...]} -> one record per row.
    n = len(lists[0])
    if any(len(v) != n for v in lists):
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in whole.items())
        yield RawRecord(
            display, line, error=(Reason.INVALID_JSON, f"columns have different lengths ({sizes})")
        )
        return
    keys = list(whole)
    for i in range(n):
        yield RawRecord(display, i + 1, obj={k: whole[k][i] for k in keys}, unit="row")


# --------------------------------------------------------------------------------------------- CSV
class _LineFeed:
    """Feeds decoded lines to csv.reader, remembering which physical lines had invalid UTF-8."""

    def __init__(self, fh: IO[bytes], bytes_read: Callable[[int], None]):
        self.fh = fh
        self.bytes_read = bytes_read
        self.lineno = 0
        self.bad_lines: dict[int, str] = {}

    def __iter__(self) -> Iterator[str]:
        for raw in self.fh:
            self.lineno += 1
            self.bytes_read(len(raw))
            if self.lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            text, err = _decode(raw)
            if text is None:
                self.bad_lines[self.lineno] = err or ""
                text = raw.decode("utf-8", "replace")
            yield text


def read_csv(path: Path, display: str, hooks: ReadHooks) -> Iterator[RawRecord]:
    """A header row, then one record per row; cells are strings (JSON cells are decoded later)."""
    csv.field_size_limit(2**31 - 1)
    with _open_binary(path) as fh:
        feed = _LineFeed(fh, hooks.bytes_read)
        reader = csv.reader(iter(feed))
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield RawRecord(
                display, max(feed.lineno, 1), error=(Reason.INVALID_CSV, f"invalid CSV header: {e}")
            )
            return
        header = [h.strip() for h in header]
        prev_end = feed.lineno
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield RawRecord(display, prev_end + 1, error=(Reason.INVALID_CSV, f"invalid CSV: {e}"))
                prev_end = feed.lineno
                continue
            start, end = prev_end + 1, feed.lineno
            prev_end = end
            if not row or all(not c.strip() for c in row):
                hooks.blank()
                continue
            bad = [ln for ln in range(start, end + 1) if ln in feed.bad_lines]
            if bad:
                yield RawRecord(
                    display, start, error=(Reason.BAD_ENCODING, feed.bad_lines[bad[0]]), raw=",".join(row)
                )
                continue
            if len(row) != len(header):
                yield RawRecord(
                    display,
                    start,
                    error=(Reason.INVALID_CSV, f"row has {len(row)} cells but the header has {len(header)}"),
                    raw=",".join(row),
                )
                continue
            obj = {k: v for k, v in zip(header, row, strict=True) if k}
            yield RawRecord(display, start, obj=obj)


# ----------------------------------------------------------------------------------------- Parquet
def _need(module: str, install: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FtError(
            ErrorCode.PACKAGE_MISSING,
            f"reading this source needs the Python package {module.split('.')[0]!r}",
            f"install it: {install}",
        ) from None


def read_parquet(path: Path, display: str, hooks: ReadHooks) -> Iterator[RawRecord]:
    """Rows in record batches (bounded memory); nested list/struct columns become lists/dicts."""
    pq = _need("pyarrow.parquet", "pip install pyarrow")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise FtError(
            ErrorCode.DATA_INVALID, f"{path}: not a readable Parquet file ({e})", "re-export the file"
        ) from None
    row = 0
    per_row = path.stat().st_size / max(pf.metadata.num_rows, 1)
    batches = pf.iter_batches(batch_size=2048)
    while True:
        try:
            batch = next(batches)
            objs = batch.to_pylist()
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged pages
            raise FtError(
                ErrorCode.BAD_COMPRESSION,
                f"{path}: the Parquet data is damaged after row {row:,} ({type(e).__name__}: {e})",
                "re-export or copy the file again",
            ) from None
        for obj in objs:
            row += 1
            yield RawRecord(display, row, obj=obj, unit="row")
        hooks.bytes_read(int(per_row * batch.num_rows))


# A file's kind (SUFFIXES' values) -> its reader.
READERS: dict[str, Callable[[Path, str, ReadHooks], Iterator[RawRecord]]] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "parquet": read_parquet,
}


# ------------------------------------------------------------------------------ Hugging Face datasets
def _load_hf(hf: dict[str, Any]) -> Any:
    datasets = _need("datasets", "pip install 'ft[hf]'  (the datasets package)")
    try:
        if hf.get("from_disk"):
            ds = datasets.load_from_disk(hf["path"])
            if isinstance(ds, datasets.DatasetDict):
                if hf["split"] is None:
                    hf = {**hf, "split": "train"}
                if hf["split"] not in ds:
                    raise FtError(
                        ErrorCode.DATA_INVALID,
                        f"{hf['path']}: no split {hf['split']!r} (has: {', '.join(ds)})",
                        "pick one with --hf-split",
                    )
                ds = ds[hf["split"]]
            return ds
        # Not streaming: datasets keeps the data in memory-mapped Arrow files, so memory stays bounded,
        # and the dataset's fingerprint identifies its content for the preparation cache.
        return datasets.load_dataset(hf["path"], hf.get("name"), split=hf["split"])
    except FtError:
        raise
    except Exception as e:
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"could not load Hugging Face dataset {hf['path']!r} (split {hf['split']!r}): {type(e).__name__}: {e}",
            "check the dataset id, --hf-split and --hf-config, and network access / HF_TOKEN for private datasets",
        ) from None


def _read_hf(hf: dict[str, Any], display: str) -> Iterator[RawRecord]:
    ds = _load_hf(hf)
    row = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        for i in range(n):
            row += 1
            yield RawRecord(display, row, obj={k: batch[k][i] for k in keys}, unit="row")


def describe(rec: RawRecord) -> str:
    return location(rec.source, rec.unit, rec.line)
