"""Prepared splits on disk: flat arrays in one safetensors file per split, read memory-mapped.

Each ``<split>.safetensors`` (train, val, test) holds, for ``n`` examples and ``T`` tokens in all:

=============  =======  =======  ===============================================================
name           dtype    shape    meaning
=============  =======  =======  ===============================================================
``offsets``    int64    n + 1    example ``i`` is ``tokens[offsets[i]:offsets[i+1]]``
``record_ids`` int64    n        where it came from: ``(file_index << 40) | line`` (see below)
``tokens``     int32    T        token ids, examples back to back
``labels``     int8     n        1 desirable, 0 undesirable, -1 unlabelled (or labels ignored)
``mask``       uint8    T        1 = the token is a training target (predicted from the ones before)
=============  =======  =======  ===============================================================

``record_ids`` of the first source file are plain line (or row) numbers; file ``k`` of a folder
adds ``k << 40``. The file is standard safetensors (``safetensors.numpy.load_file`` reads it); we
write it ourselves, streaming, so that memory stays bounded for any dataset size.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ft.data.validate import location
from ft.errors import ErrorCode, FtError

SPLIT_SUFFIX = ".safetensors"
FORMAT_TAG = "ft-split/1"
FILE_SHIFT = 40
_ST_DTYPES: dict[np.dtype, str] = {
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
# int64 arrays first so every array starts aligned to its item size.
_ORDER = ("offsets", "record_ids", "tokens", "labels", "mask")


METADATA = "metadata.jsonl"  # {"record_id": ..., KEY: value, ...} per kept record that had extra fields


def split_path(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}{SPLIT_SUFFIX}"


def meta_text(value: Any) -> str | None:
    """A metadata value as one group/stratum name: strings as they are, other JSON compactly; None if absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def read_metadata(folder: Path) -> dict[int, dict[str, Any]]:
    """The extra fields of every kept record that had any, by record id (from ``metadata.jsonl``)."""
    path = Path(folder) / METADATA
    out: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                out[int(row.pop("record_id"))] = row
    return out


def group_values(folder: Path, split: str, key: str) -> list[str | None]:
    """Metadata ``key`` of every example of a prepared ``split``, in the split file's order.

    For per-group evaluation (``--group-by KEY``): ``values[i]`` belongs to example ``i`` of
    ``load_split(split_path(folder, split))``; None where the record had no such field. Any extra
    field of the records works; the dataset's manifest names the one chosen at prepare time
    (``manifest["options"]["group_by"]``).
    """
    meta = read_metadata(folder)
    ids = load_split(split_path(folder, split)).record_ids
    return [meta_text(meta.get(int(r), {}).get(key)) for r in ids.tolist()]


def make_record_id(file_index: int, line: int) -> int:
    return (file_index << FILE_SHIFT) | line


def split_record_id(record_id: int) -> tuple[int, int]:
    """(file index, line or row number) of a stored record id."""
    return int(record_id) >> FILE_SHIFT, int(record_id) & ((1 << FILE_SHIFT) - 1)


def locate(sources: list[Any], record_id: int) -> str:
    """Where a stored record came from (``file:LINE``, ``file row N``, ``file[INDEX]``), from the
    manifest's ``sources`` (each with ``display`` and ``unit``)."""
    fidx, number = split_record_id(record_id)
    src = sources[fidx] if fidx < len(sources) and isinstance(sources[fidx], dict) else {}
    name = src.get("display") or ""
    return location(name, src.get("unit") or "line", number) if name else f"record {number}"


class TokenPool:
    """Append-only scratch store of every kept example's tokens and mask, before the split is known."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tok = open(self.folder / "pool.tokens", "wb")  # noqa: SIM115 - closed in finish()
        self._mask = open(self.folder / "pool.mask", "wb")  # noqa: SIM115
        self.lengths = array("q")
        self.tokens: np.ndarray | None = None
        self.mask: np.ndarray | None = None

    def append(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self._tok.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._mask.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        self.lengths.append(len(ids))

    def length_array(self) -> np.ndarray:
        """Every example's token count, in pool order (a view of ``lengths``: take it after the last append)."""
        return np.frombuffer(self.lengths, dtype=np.int64) if len(self.lengths) else np.zeros(0, np.int64)

    def finish(self) -> None:
        self._tok.close()
        self._mask.close()
        total = int(sum(self.lengths))
        self.tokens = (
            np.memmap(self.folder / "pool.tokens", np.int32, "r", shape=(total,))
            if total
            else np.zeros(0, np.int32)
        )
        self.mask = (
            np.memmap(self.folder / "pool.mask", np.uint8, "r", shape=(total,))
            if total
            else np.zeros(0, np.uint8)
        )

    def remove(self) -> None:
        self.tokens = self.mask = None
        for name in ("pool.tokens", "pool.mask"):
            (self.folder / name).unlink(missing_ok=True)


def write_split(
    path: Path,
    pool: TokenPool,
    indices: np.ndarray,
    labels: np.ndarray,
    record_ids: np.ndarray,
    metadata: dict[str, str] | None = None,
    chunk_tokens: int = 1 << 22,
) -> None:
    """Write the examples ``indices`` of ``pool`` (in that order) as one safetensors split file."""
    assert pool.tokens is not None and pool.mask is not None
    lengths_all = pool.length_array()
    starts_all = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    lengths = lengths_all[indices]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n, total = len(indices), int(offsets[-1])
    shapes = {
        "offsets": (n + 1, np.int64),
        "record_ids": (n, np.int64),
        "tokens": (total, np.int32),
        "labels": (n, np.int8),
        "mask": (total, np.uint8),
    }
    header: dict[str, Any] = {}
    pos = 0
    for name in _ORDER:
        count, dt = shapes[name]
        size = count * np.dtype(dt).itemsize
        header[name] = {
            "dtype": _ST_DTYPES[np.dtype(dt)],
            "shape": [count],
            "data_offsets": [pos, pos + size],
        }
        pos += size
    header["__metadata__"] = {"format": FORMAT_TAG, **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        fh.write(offsets.tobytes())
        fh.write(np.asarray(record_ids, dtype=np.int64).tobytes())
        for piece in _gather(pool.tokens, starts_all, indices, chunk_tokens):
            fh.write(piece.tobytes())
        fh.write(np.asarray(labels, dtype=np.int8).tobytes())
        for piece in _gather(pool.mask, starts_all, indices, chunk_tokens):
            fh.write(piece.tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def _gather(
    arr: np.ndarray, starts: np.ndarray, indices: np.ndarray, chunk_tokens: int
) -> Iterator[np.ndarray]:
    """The slices of ``arr`` for ``indices``, concatenated in chunks of about ``chunk_tokens``.

    Runs of consecutive indices (most of a split kept in source order) are copied as one slice.
    """
    arr = np.asarray(arr)  # a plain view: slicing a memmap subclass is slower
    if len(indices) == 0:
        return
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    run_first = indices[np.concatenate([[0], breaks])]
    run_last = indices[np.concatenate([breaks - 1, [len(indices) - 1]])]
    buf: list[np.ndarray] = []
    size = 0
    for a, b in zip(starts[run_first].tolist(), starts[run_last + 1].tolist(), strict=True):
        while a < b:
            take = min(b - a, chunk_tokens)
            buf.append(arr[a : a + take])
            size += take
            a += take
            if size >= chunk_tokens:
                yield np.concatenate(buf)
                buf, size = [], 0
    if buf:
        yield np.concatenate(buf)


class PreparedSplit:
    """A prepared split, memory-mapped: ``len(split)``, ``split.tokens(i)``, ``split.mask(i)``, ..."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                (hlen,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(hlen))
        except (OSError, struct.error, ValueError) as e:
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"{self.path}: not a prepared split ({e})",
                "prepare the dataset again with `ft dataset prepare`",
            ) from None
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        missing = [k for k in _ORDER if k not in header]
        if missing:
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"{self.path}: missing arrays {missing}",
                "prepare the dataset again with `ft dataset prepare`",
            )
        size = self.path.stat().st_size
        mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 8 + hlen else np.zeros(0, np.uint8)
        base = 8 + hlen
        arrays: dict[str, np.ndarray] = {}
        for name in _ORDER:
            info = header[name]
            dt = _NP_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            count = (end - start) // dt.itemsize
            arrays[name] = (
                np.ndarray((count,), dtype=dt, buffer=mm, offset=base + start) if count else np.zeros(0, dt)
            )
        self._offsets = arrays["offsets"]
        self._tokens = arrays["tokens"]
        self._mask = arrays["mask"]
        self.record_ids: np.ndarray = arrays["record_ids"]
        self.labels: np.ndarray = arrays["labels"]
        self.lengths: np.ndarray = (
            np.diff(self._offsets).astype(np.int64) if len(self._offsets) else np.zeros(0, np.int64)
        )

    def __len__(self) -> int:
        return len(self.record_ids)

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[self._offsets[i] : self._offsets[i + 1]]

    def mask(self, i: int) -> np.ndarray:
        return self._mask[self._offsets[i] : self._offsets[i + 1]].view(np.bool_)

    @property
    def num_trained_tokens(self) -> int:
        return int(np.count_nonzero(self._mask))


def load_split(path: Path | str) -> PreparedSplit:
    """Open a prepared split file (memory-mapped; nothing is read until used)."""
    return PreparedSplit(Path(path))
