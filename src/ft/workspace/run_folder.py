"""The run folder's vocabulary, in one place: file names, step folders, pointers, verification, resolution.

``runs/<id>/`` holds ``config.json`` (the run's snapshot), ``metrics.jsonl``, ``train.log``, ``loss.png``,
``eval/``, ``export/`` and ``checkpoints/``, whose ``step-NNNNNN/`` folders hold:

=========================  ==========================================================================
``adapters.safetensors``   the trained weights (LoRA/DoRA matrices, or every trained weight for full)
``adapter_config.json``    enough to rebuild the model: base model, method, rank, alpha, targets, layers
``optimizer.safetensors``  the optimizer state (moments, step count, learning rate)
``trainer_state.json``     step, epoch, position in the epoch's plan, best metric, counters
``config.json``            the run's snapshot (the resolved train.yml, the dataset) at that step
``reference.safetensors``  preference runs, reference by adapters off: each sequence's reference
                           log-probability kept so far (NaN: not computed yet); optional
``manifest.json``          sha256 and size of every file above
=========================  ==========================================================================

``latest`` and ``best`` are small text files naming a step folder (a symlink is accepted too); a pointer
never leads out of its ``checkpoints/`` folder. The writer is :mod:`ft.engine.checkpoint`; every reader
(resume, ``ft runs``, ``ft evaluate``, ``ft export``, ``ft serve``) goes through this module, so a step
folder is parsed, a pointer followed and ``best`` falls back the same way everywhere.

Nothing here needs MLX: a safetensors file is checked from its header and sizes.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ft.workspace.atomic import atomic_write_text, sha256_file

# ------------------------------------------------------------------------------- names
CONFIG = "config.json"  # the run's snapshot: in the run folder and in every checkpoint
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
EVAL_DIR = "eval"
EXPORT_DIR = "export"

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
KEPT_REFERENCE = "reference.safetensors"
MANIFEST = "manifest.json"
REQUIRED = (ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, TRAINER_STATE, CONFIG)

LATEST, BEST = "latest", "best"
POINTERS = (BEST, LATEST)
CORRUPT_PREFIX = "corrupt-"
SUPERSEDED_PREFIX = "superseded-"

_STEP_FOLDER = re.compile(r"^step-(\d+)$")
_STEP_SPEC = re.compile(r"^(?:step-)?(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a step folder's name (``step-000100`` -> 100); None for any other name."""
    m = _STEP_FOLDER.match(name)
    return int(m.group(1)) if m else None


def parse_step_spec(spec: str) -> int | None:
    """The step a user asked for: ``step-N`` or ``N`` (None when ``spec`` is neither)."""
    m = _STEP_SPEC.match(spec)
    return int(m.group(1)) if m else None


def step_folders(ckpts: Path) -> list[Path]:
    """The ``step-N`` folders of a checkpoints folder, oldest first (temporary, corrupt, superseded skipped)."""
    ckpts = Path(ckpts)
    if not ckpts.is_dir():
        return []
    found = [(s, p) for p in ckpts.iterdir() if p.is_dir() and (s := parse_step(p.name)) is not None]
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------- pointers
def set_pointer(ckpts: Path, pointer: str, target: str) -> None:
    atomic_write_text(Path(ckpts) / pointer, target + "\n")


def read_pointer(ckpts: Path, pointer: str) -> Path | None:
    """The step folder ``checkpoints/<pointer>`` names (a text file, or a symlink), when it is a folder
    directly inside ``ckpts``; None otherwise (missing, dangling, or leading out of the run)."""
    ckpts = Path(ckpts)
    p = ckpts / pointer
    if p.is_symlink():
        target = p.resolve()
    elif p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            return None
        target = (ckpts / text).resolve()
    else:
        return None
    if not target.is_dir() or target.parent != ckpts.resolve() or parse_step(target.name) is None:
        return None
    return ckpts / target.name


def pointer_name(ckpts: Path, pointer: str) -> str | None:
    """The name of the step folder a pointer names (None when it names none)."""
    p = read_pointer(ckpts, pointer)
    return p.name if p else None


@dataclass
class Resolved:
    """A step folder picked by :func:`resolve`, with what the user should know about the choice."""

    path: Path
    note: str | None = None


def resolve(ckpts: Path, which: str = BEST) -> Resolved | None:
    """The step folder ``which`` (best | latest | step-N | N) of a checkpoints folder; None when there is none.

    One fallback order for every command: ``best`` without a best pointer (no validation) is the latest,
    ``latest`` without a latest pointer is the newest step folder; a fallback says so in ``note``.
    Raises ValueError when ``which`` is none of these forms.
    """
    steps = step_folders(ckpts)
    if which in POINTERS:
        found = read_pointer(ckpts, which)
        if found is not None:
            return Resolved(found)
        if which == LATEST:
            return Resolved(steps[-1]) if steps else None
        latest = read_pointer(ckpts, LATEST) or (steps[-1] if steps else None)
        if latest is None:
            return None
        return Resolved(latest, f"no best checkpoint (no validation loss); used the latest, {latest.name}")
    want = parse_step_spec(which)
    if want is None:
        raise ValueError(f"{which!r} is not best, latest or step-N")
    return next((Resolved(p) for p in steps if parse_step(p.name) == want), None)


# ------------------------------------------------------------------------------- verification
SAFETENSORS_DTYPE_BYTES = {  # bytes per element of each safetensors dtype
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
}


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a sound safetensors file (None when it is): header length, JSON, tensor extents."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > size - 8 or n > 100_000_000:
                return f"{path.name}: bad safetensors header (header length {n} in a {size}-byte file)"
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path.name}: bad safetensors header ({type(e).__name__}: {e})"
    if not isinstance(header, dict):
        return f"{path.name}: bad safetensors header (not a JSON object)"
    data = size - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            want = count * SAFETENSORS_DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"{path.name}: bad safetensors header entry for {name!r}"
        if not (0 <= begin <= end <= data) or end - begin != want:
            return f"{path.name}: tensor {name!r} lies outside the file (truncated?)"
        end_max = max(end_max, end)
    if end_max != data:
        return f"{path.name}: {data} data bytes but the tensors need {end_max} (truncated or padded)"
    return None


def write_manifest(folder: Path, step: int) -> None:
    """``manifest.json``: the sha256 and size of every file of ``folder`` (written last)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {
        "step": step,
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def verify_checkpoint(path: Path, *, hashes: bool = True) -> list[str]:
    """Every problem of the checkpoint folder ``path`` (empty = good): missing files, size/sha256, headers.

    ``hashes=False`` skips the sha256 of each file (sizes and headers only: quick even for full weights).
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path.name}: not a folder"]
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        return [f"{MANIFEST} is missing (an incomplete save?)"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"]
    problems = [f"{name} is missing" for name in REQUIRED if name not in files]
    for name, info in sorted(files.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        if f.stat().st_size != info.get("bytes"):
            problems.append(
                f"{name}: {f.stat().st_size} bytes, the manifest says {info.get('bytes')} (truncated?)"
            )
        elif hashes and sha256_file(f) != info.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (damaged or changed)")
        if name.endswith(".safetensors") and (p := safetensors_problem(f)):
            problems.append(p)
        elif name.endswith(".json"):
            try:
                json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"{name}: not valid JSON ({e})")
    return problems


@dataclass
class Rejected:
    name: str
    problems: list[str]
    moved_to: str | None = None

    def describe(self) -> str:
        where = f" (moved to {self.moved_to})" if self.moved_to else ""
        return f"{self.name} is damaged{where}: " + "; ".join(self.problems)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``corrupt-step-NNNNNN[-k]``: kept for inspection, never read again."""
    path = Path(path)
    k, target = 1, path.with_name(CORRUPT_PREFIX + path.name)
    while target.exists():
        k += 1
        target = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{k}")
    os.replace(path, target)
    return target


def find_good_checkpoint(
    ckpts: Path, *, newest: str | None = None, quarantine: bool = True
) -> tuple[Path | None, list[Rejected]]:
    """The newest step folder that verifies (at or below step folder ``newest`` when given), and those
    rejected on the way. Damaged folders are set aside (``quarantine``) so no pointer or later save trusts them.
    """
    limit = parse_step(newest) if newest else None
    rejected: list[Rejected] = []
    for p in reversed(step_folders(ckpts)):
        if limit is not None and (parse_step(p.name) or 0) > limit:
            continue
        problems = verify_checkpoint(p)
        if not problems:
            return p, rejected
        r = Rejected(p.name, problems)
        if quarantine:
            r.moved_to = set_aside(p).name
        rejected.append(r)
    return None, rejected


def folders_after(ckpts: Path, step: int) -> list[Path]:
    """The step folders newer than ``step``."""
    return [p for p in step_folders(ckpts) if (parse_step(p.name) or 0) > step]
