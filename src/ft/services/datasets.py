"""Datasets: `ft dataset prepare|list|info|show|rm`, and dataset lookup for training.

A prepared dataset lives in ``datasets/<name>/v<version>/`` (splits, manifest.json, stats.json,
rejected.jsonl, lengths.png) and in the workspace registry (table ``datasets``, key name+version,
``meta.path`` = the folder relative to the workspace). Preparing the same source files with the same
tokenizer and options again is a cache hit; anything different makes a new version. Nothing is
overwritten: a version folder appears complete (atomic rename) or not at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

import ft.models  # noqa: F401  (sets up transformers quietly: no "PyTorch was not found" advisory)
from ft import __version__
from ft.config.loader import load_config
from ft.config.train import TrainConfig
from ft.data import prepare as pipeline
from ft.data.formats import FORMAT_CHOICES, UNKNOWN_TOOL_CHOICES, load_tools
from ft.data.prepare import PrepareOptions, Progress, TooManyBadRecords
from ft.data.readers import Source, open_source
from ft.data.stats import DatasetStats, steps_per_epoch
from ft.data.store import load_split, locate, split_path
from ft.data.templates import TEMPLATE_CHOICES, make_template
from ft.data.tokenize import TRAIN_ON_CHOICES, TextTokenizer
from ft.data.validate import parse_max_bad
from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir, atomic_write_json, clean_leftovers

TABLE = "datasets"
MANIFEST = "manifest.json"
FAILED = ".failed"  # datasets/.failed/NAME/: the report of NAME's last failed prepare
SPLITS = ("train", "val", "test")
LABEL_CHOICES = ("sft-desirable", "all", "keep")
ON_LONG_CHOICES = ("truncate", "drop", "error")
# Bump when the prepared layout or pipeline changes meaning: old caches then miss.
PIPELINE_VERSION = 2  # 2: tool calls and tool results are rendered (they were rejected or dropped)


# ----------------------------------------------------------------------------------------- results
class DatasetResult(BaseModel):
    """What `ft dataset prepare` did."""

    name: str
    version: int
    path: str
    cache_hit: bool
    source: str
    model: str
    template: str
    splits: dict[str, str]
    stats: DatasetStats
    rejected_file: str
    plot_file: str | None = None
    warnings: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    """About the dataset's other versions: a newer one, a different source under the same name."""
    ref: str = ""
    """What to pass to `ft train --dataset` for exactly this version (NAME, or NAME@vN if not the newest)."""


class DatasetSummary(BaseModel):
    name: str
    version: int
    created_at: str
    source: str
    model: str
    records: dict[str, int]
    path: str


class DatasetList(BaseModel):
    datasets: list[DatasetSummary]


class DatasetInfo(BaseModel):
    summary: DatasetSummary
    manifest: dict[str, Any]
    stats: DatasetStats
    versions: list[int]


class Segment(BaseModel):
    text: str
    trained: bool


class ShownRecord(BaseModel):
    index: int
    where: str
    label: int
    tokens: int
    trained_tokens: int
    segments: list[Segment]


class ShowResult(BaseModel):
    name: str
    version: int
    split: str
    total: int
    records: list[ShownRecord]


class RemoveResult(BaseModel):
    name: str
    removed_versions: list[int]
    removed_leftovers: list[str] = Field(default_factory=list)
    """Folders of failed or interrupted prepares that were removed (relative to the workspace)."""


class ResolvedDataset(BaseModel):
    """Where a prepared dataset's files are (for the training service)."""

    name: str
    version: int
    path: Path
    splits: dict[str, Path]
    manifest: dict[str, Any]
    note: str | None = None
    """Set when a bare NAME picked the newest of several versions (say so to the user)."""


# ------------------------------------------------------------------------------------------ lookup
def _rows(ws: Workspace, name: str) -> list[dict[str, Any]]:
    return sorted(ws.registry().list(TABLE, name=name), key=lambda r: int(r["version"]))


def _folder(ws: Workspace, row: dict[str, Any]) -> Path:
    rel = row["meta"].get("path") or f"datasets/{row['name']}/v{row['version']}"
    return (ws.root / rel).resolve()


def _row(ws: Workspace, name: str, version: int | None) -> dict[str, Any]:
    validate_name(name, "dataset name")
    rows = _rows(ws, name)
    if not rows:
        known = sorted({r["name"] for r in ws.registry().list(TABLE)})
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"no dataset named {name!r} in this workspace"
            + (f" (have: {', '.join(known)})" if known else ""),
            "prepare it with: ft dataset prepare SOURCE --name " + name,
        )
    if version is None:
        return rows[-1]
    for r in rows:
        if int(r["version"]) == version:
            return r
    raise FtError(
        ErrorCode.NOT_FOUND,
        f"dataset {name!r} has no version {version}",
        f"versions: {', '.join(str(r['version']) for r in rows)}",
    )


def resolve_dataset(ws: Workspace, name: str, version: int | None = None) -> ResolvedDataset:
    """A prepared dataset's folder and split files (latest version unless ``version``)."""
    row = _row(ws, name, version)
    folder = _folder(ws, row)
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"dataset {name} v{row['version']}: {folder} is missing or incomplete",
            f"remove it with `ft dataset rm {name} --version {row['version']}` and prepare it again",
        )
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    splits = {s: split_path(folder, s) for s in SPLITS if split_path(folder, s).is_file()}
    return ResolvedDataset(
        name=name, version=int(row["version"]), path=folder, splits=splits, manifest=manifest
    )


def parse_dataset_ref(spec: str, option: str = "--dataset") -> tuple[str, int | None]:
    """``NAME`` -> (NAME, None); ``NAME@vN`` or ``NAME@N`` -> (NAME, N)."""
    name, at, ver = spec.partition("@")
    validate_name(name, "dataset name")
    if not at:
        return name, None
    try:
        version = int(ver[1:] if ver[:1] in ("v", "V") else ver)
    except ValueError:
        version = 0
    if version < 1:
        raise FtError(
            ErrorCode.USAGE,
            f"{option} {spec!r}: the version after '@' must be a positive number",
            f"e.g. {option} {name}@v1 (versions: ft dataset info {name})",
        )
    return name, version


def resolve_dataset_ref(ws: Workspace, spec: str, version: int | None = None) -> ResolvedDataset:
    """A dataset named as the user typed it (``NAME`` or ``NAME@vN``; ``version`` wins if given).

    A bare NAME takes the newest version; when there are several, ``note`` says which was taken.
    """
    name, ref_version = parse_dataset_ref(spec)
    explicit = version if version is not None else ref_version
    resolved = resolve_dataset(ws, name, explicit)
    if explicit is None:
        versions = [int(r["version"]) for r in _rows(ws, name)]
        if len(versions) > 1:
            older = ", ".join(f"{name}@v{v}" for v in versions if v != resolved.version)
            resolved.note = (
                f"dataset {name} has {len(versions)} versions: using v{resolved.version}, the newest; "
                f"name another one with --dataset {older}"
            )
    return resolved


# ----------------------------------------------------------------------------------------- prepare
def _model_folder(ws: Workspace, model: str) -> Path:
    """The folder holding the model's tokenizer: a pulled model's, or a local folder path."""
    candidates: list[Path] = []
    try:
        candidates.append(ws.model_dir(model))
    except FtError:
        pass  # not a plain name (e.g. a repo id or a path)
    p = Path(model).expanduser()
    candidates += [p if p.is_absolute() else ws.root / p]
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c / "tokenizer_config.json").is_file():
            return c
    raise FtError(
        ErrorCode.NOT_FOUND,
        f"model {model!r} is not in this workspace, so its tokenizer and chat template are not available",
        f"pull it first: ft models pull {model}",
    )


def load_tokenizer(folder: Path, model: str) -> TextTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a broken tokenizer folder
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"cannot load the tokenizer of {model} from {folder}: {e}",
            f"pull the model again: ft models pull {model}",
        ) from None
    return TextTokenizer.from_hf(tok, name=model)


def default_name(source: str) -> str:
    text = source.removeprefix("hf:").rstrip("/")
    stem = Path(text).name
    for suffix in (".gz", ".bz2", ".xz", ".jsonl", ".ndjson", ".json", ".csv", ".parquet"):
        stem = stem.removesuffix(suffix)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "dataset"
    return name[:64]


def _cache_key(identity: list[dict[str, Any]], tok_fp: str, template_src: str, opts: PrepareOptions) -> str:
    payload = {
        "pipeline": PIPELINE_VERSION,
        # File contents and names, not where the workspace sits on disk (HF sources keep their id).
        "sources": [{k: v for k, v in i.items() if k != "path" or "sha256" not in i} for i in identity],
        "tokenizer": tok_fp,
        "template": hashlib.sha256(template_src.encode()).hexdigest(),
        "options": opts.output_options(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def prepare_dataset(
    ws: Workspace,
    source: str | None = None,
    *,
    name: str | None = None,
    fmt: str | None = None,
    template: str | None = None,
    labels: str | None = None,
    val_split: float | None = None,
    test_split: float | None = None,
    train_on: str | None = None,
    max_seq_length: int | None = None,
    on_long: str | None = None,
    max_bad: str | float | None = None,
    show_content: bool = False,
    model: str | None = None,
    hf_split: str | None = None,
    hf_config: str | None = None,
    tools: str | None = None,
    unknown_tool: str | None = None,
    stratify_by: str | None = None,
    group_by: str | None = None,
    overrides: list[str] | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> DatasetResult:
    """Prepare SOURCE (default: train.yml's data.path); any option left None comes from train.yml.

    ``tools``: a JSON file of tool definitions for records without their own ``tools`` (default: train.yml's
    ``data.tools``); ``unknown_tool``: ``warn`` or ``error`` for a call to a tool missing from the definitions.
    """
    cfg = config or load_config(ws, overrides or []).config
    d = cfg.data
    opts = PrepareOptions(
        format=_choice("--format", fmt or d.format, FORMAT_CHOICES),
        train_on=_choice("--train-on", train_on or d.train_on, TRAIN_ON_CHOICES),
        labels=_choice("--labels", labels or d.labels, LABEL_CHOICES),
        val_split=d.val_split if val_split is None else val_split,
        test_split=d.test_split if test_split is None else test_split,
        seed=cfg.training.seed,
        max_seq_length=max_seq_length or d.max_seq_length,
        on_long=_choice("--on-long", on_long or d.on_long, ON_LONG_CHOICES),
        show_content=show_content,
        stratify_by=_meta_key("--stratify-by", stratify_by or d.stratify_by),
        group_by=_meta_key("--group-by", group_by or d.group_by),
        max_bad=parse_max_bad(d.max_bad if max_bad is None else max_bad),
        batch_size=cfg.training.batch_size,
        grad_accumulation_steps=cfg.training.grad_accumulation_steps,
        # --tools is relative to where the user stands, train.yml's data.tools to the workspace
        tools=load_tools(tools) if tools else (load_tools(ws.root / d.tools) if d.tools else None),
        unknown_tool=_choice("--unknown-tool", unknown_tool or d.unknown_tool, UNKNOWN_TOOL_CHOICES),
    )
    _check_fractions(opts)
    template_name = _choice("--template", template or d.template, TEMPLATE_CHOICES)
    model_name = model or cfg.model.name
    spec = source or d.path
    # A SOURCE typed on the command line may be relative to where the user stands; train.yml's
    # data.path is relative to the workspace.
    given = Path(spec).expanduser() if source else None
    where = given.resolve() if given is not None and not given.is_absolute() and given.exists() else spec
    src = open_source(where, base=ws.root, hf_split=hf_split, hf_name=hf_config)
    name = validate_name(name or default_name(spec), "dataset name")

    tok = load_tokenizer(_model_folder(ws, model_name), model_name)
    tmpl = make_template(template_name, tok.chat_template, tok.special, model_name)
    if progress:
        progress(Progress(bytes_total=src.total_bytes, stage="hashing"))
    identity = src.identity()
    key = _cache_key(identity, tok.fingerprint(), tmpl.source, opts)

    base = ws.dataset_dir(name)
    _reconcile(ws, name, base)
    hit = _cache_hit(ws, name, key, opts)
    if hit is not None:
        return _with_version_notes(ws, hit, identity)

    base.mkdir(parents=True, exist_ok=True)
    clean_leftovers(base)
    version = _next_version(ws, name, base)
    try:
        while True:
            final = base / f"v{version}"
            try:
                with atomic_dir(final) as tmp:
                    stats = _run(src, tok, tmpl, opts, tmp, _failed_dir(ws, name), progress)
                    manifest = _manifest(
                        name, version, spec, identity, src, model_name, tok, tmpl, opts, key, stats
                    )
                    atomic_write_json(tmp / MANIFEST, manifest)
                break
            except FileExistsError:
                version += 1  # another process took this version number meanwhile
    except BaseException:
        _drop_if_empty(base)  # a first version that failed leaves no datasets/NAME/ behind
        raise
    shutil.rmtree(_failed_dir(ws, name), ignore_errors=True)  # an old failure report is out of date
    _register(ws, name, version, final, spec, manifest, stats)
    return _with_version_notes(
        ws, _result(ws, name, version, final, False, spec, model_name, tmpl.name, stats), identity
    )


def _source_names(identity: list[dict[str, Any]]) -> str:
    shown = [str(i.get("display") or i.get("path") or "?") for i in identity[:3]]
    return ", ".join(shown) + (f" and {len(identity) - 3} more" if len(identity) > 3 else "")


def _content(identity: list[dict[str, Any]]) -> list[Any]:
    return sorted(str(i.get("sha256") or i.get("fingerprint") or i.get("path")) for i in identity)


def _with_version_notes(ws: Workspace, r: DatasetResult, identity: list[dict[str, Any]]) -> DatasetResult:
    """Say how this version relates to the name's other versions, and how to train on exactly it."""
    rows = _rows(ws, r.name)
    newest = max((int(x["version"]) for x in rows), default=r.version)
    r.ref = r.name if newest == r.version else f"{r.name}@v{r.version}"
    if newest > r.version:
        r.notes.append(
            f"{r.name} v{newest} is newer than this v{r.version}: `--dataset {r.name}` means v{newest}; "
            f"train on this one with --dataset {r.ref}"
        )
    if r.cache_hit:
        return r
    older = [x for x in rows if int(x["version"]) < r.version]
    if not older:
        return r
    prev = older[-1]
    try:
        manifest = json.loads((_folder(ws, prev) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return r
    before = manifest.get("sources") or []
    v = int(prev["version"])
    if _content(before) == _content(identity):
        return r  # same data, other options
    if (prev.get("source") or "") != r.source:
        r.notes.append(
            f"{r.name} v{v} was prepared from a different source ({prev.get('source')}: "
            f"{_source_names(before)}); this v{r.version} is {r.source}. `--dataset {r.name}` now means "
            f"v{r.version} (v{v} stays: {r.name}@v{v}); use --name to keep different data apart"
        )
    else:
        r.notes.append(
            f"the data in {r.source} changed since {r.name} v{v} (other file contents): this is v{r.version}, "
            f"and `--dataset {r.name}` now means it (v{v} stays: {r.name}@v{v})"
        )
    return r


def prepare_from_config(
    ws: Workspace,
    config: TrainConfig,
    progress: Callable[[Progress], None] | None = None,
    name: str | None = None,
) -> DatasetResult:
    """Prepare train.yml's data.path with train.yml's options (a cache hit when already prepared)."""
    return prepare_dataset(ws, None, name=name, config=config, progress=progress)


def _choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FtError(
            ErrorCode.USAGE,
            f"{option} {value!r} is not one of {', '.join(choices)}",
            f"use one of: {', '.join(choices)}",
        )
    return value


def _meta_key(option: str, key: str | None) -> str | None:
    if key is None:
        return None
    if not key.strip():
        raise FtError(ErrorCode.USAGE, f"{option} needs a field name", f"e.g. {option} category")
    return key


def _check_fractions(opts: PrepareOptions) -> None:
    for opt, v in (("--val", opts.val_split), ("--test", opts.test_split)):
        if not 0 <= v < 1:
            raise FtError(ErrorCode.USAGE, f"{opt} {v} must be at least 0 and below 1", "e.g. --val 0.2")
    if opts.val_split + opts.test_split >= 1:
        raise FtError(
            ErrorCode.USAGE,
            f"--val {opts.val_split} + --test {opts.test_split} leave nothing to train on",
            "keep their sum below 1",
        )
    if opts.max_seq_length < 2:
        raise FtError(ErrorCode.USAGE, f"--max-seq-length {opts.max_seq_length} is too small", "e.g. 2048")


def _failed_dir(ws: Workspace, name: str) -> Path:
    """Where the report of NAME's last failed prepare is kept (removed by `ft dataset rm NAME`)."""
    return ws.datasets_dir / FAILED / name


def _drop_if_empty(folder: Path) -> None:
    """Remove ``folder`` when nothing is in it (another process's work in progress is left alone)."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _run(
    src: Source,
    tok: TextTokenizer,
    tmpl: Any,
    opts: PrepareOptions,
    tmp: Path,
    failed: Path,
    progress: Callable[[Progress], None] | None,
) -> DatasetStats:
    try:
        return pipeline.prepare(src, tok, tmpl, opts, tmp, progress)
    except FtError as e:
        # A failure about the records (too many invalid ones, too long, none usable) keeps its report,
        # the dataset itself is not created; any other failure has no report to keep.
        shutil.rmtree(failed, ignore_errors=True)
        if not (tmp / pipeline.STATS).is_file():
            raise
        failed.mkdir(parents=True)
        for f in (pipeline.REJECTED, pipeline.STATS):
            if (tmp / f).is_file():
                shutil.copy2(tmp / f, failed / f)
        e.message += f"\nEvery rejected record is listed in {failed / pipeline.REJECTED}"
        e.args = (e.message,)
        raise


def _register(
    ws: Workspace,
    name: str,
    version: int,
    folder: Path,
    source: str,
    manifest: dict[str, Any],
    stats: DatasetStats,
) -> None:
    ws.registry().upsert(
        TABLE,
        {"name": name, "version": version},
        source=source,
        meta={
            "path": folder.relative_to(ws.root).as_posix(),
            "cache_key": manifest.get("cache_key"),
            "model": manifest.get("tokenizer", {}).get("model", ""),
            "template": manifest.get("template", {}).get("name"),
            "records": {s: v.records for s, v in stats.splits.items()},
            "kept": stats.kept,
        },
    )


def _reconcile(ws: Workspace, name: str, base: Path) -> None:
    """Register complete version folders the registry lacks (a process stopped between rename and insert)."""
    if not base.is_dir():
        return
    known = {int(r["version"]) for r in _rows(ws, name)}
    for folder in base.glob("v*"):
        if not folder.name[1:].isdigit() or int(folder.name[1:]) in known:
            continue
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            stats = DatasetStats.model_validate_json((folder / pipeline.STATS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        _register(ws, name, int(folder.name[1:]), folder, manifest.get("source", ""), manifest, stats)


def _next_version(ws: Workspace, name: str, base: Path) -> int:
    known = [int(r["version"]) for r in _rows(ws, name)]
    known += [int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit()]
    return max(known, default=0) + 1


def _cache_hit(ws: Workspace, name: str, key: str, opts: PrepareOptions) -> DatasetResult | None:
    for row in reversed(_rows(ws, name)):
        if row["meta"].get("cache_key") != key:
            continue
        folder = _folder(ws, row)
        if not (folder / MANIFEST).is_file() or not (folder / pipeline.STATS).is_file():
            continue  # the folder was removed by hand: prepare again
        stats = DatasetStats.model_validate_json((folder / pipeline.STATS).read_text(encoding="utf-8"))
        if stats.bad_fraction > opts.max_bad + 1e-12:
            stats.max_bad = opts.max_bad
            raise TooManyBadRecords(stats, *pipeline.too_many_bad_message(stats))
        # Batch settings may have changed since: recompute the estimate, report the current threshold.
        stats.max_bad = opts.max_bad
        stats.batch_size, stats.grad_accumulation_steps = opts.batch_size, opts.grad_accumulation_steps
        stats.steps_per_epoch = steps_per_epoch(
            stats.splits["train"].records, opts.batch_size, opts.grad_accumulation_steps
        )
        m = row["meta"]
        return _result(
            ws,
            name,
            int(row["version"]),
            folder,
            True,
            row.get("source") or "",
            m.get("model", ""),
            m.get("template", ""),
            stats,
        )
    return None


def _manifest(
    name: str,
    version: int,
    spec: str,
    identity: list[dict[str, Any]],
    src: Source,
    model: str,
    tok: TextTokenizer,
    tmpl: Any,
    opts: PrepareOptions,
    key: str,
    stats: DatasetStats,
) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "ft_version": __version__,
        "pipeline_version": PIPELINE_VERSION,
        "source": spec,
        "sources": [{**i, "unit": src.units.get(k, "line")} for k, i in enumerate(identity)],
        "splits_given": src.given_splits,
        "record_ids": "(file_index << 40) | line; file_index into sources"
        if len(identity) > 1
        else "line or row",
        "format": opts.format,
        "formats_found": stats.formats,
        "template": {"name": tmpl.name, "sha256": hashlib.sha256(tmpl.source.encode()).hexdigest()},
        "tokenizer": {
            "model": model,
            "fingerprint": tok.fingerprint(),
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
        },
        "options": opts.output_options() | {"max_bad": opts.max_bad},
        "cache_key": key,
        "counts": {
            "records_read": stats.records_read,
            "kept": stats.kept,
            "bad": stats.bad,
            "rejected": stats.rejected,
            "skipped_undesirable": stats.skipped_undesirable,
            "splits": {s: v.records for s, v in stats.splits.items()},
        },
        "splits": {s: f"{s}.safetensors" for s in stats.splits},
    }


def _result(
    ws: Workspace,
    name: str,
    version: int,
    folder: Path,
    hit: bool,
    spec: str,
    model: str,
    template: str,
    stats: DatasetStats,
) -> DatasetResult:
    warnings = []
    dropped_long = stats.rejected.get("too_long", 0)
    if stats.records_read and dropped_long / stats.records_read > 0.05:
        warnings.append(
            f"{dropped_long} records ({dropped_long / stats.records_read:.0%}) were longer than "
            f"max_seq_length {stats.max_seq_length} and dropped; consider raising it or --on-long truncate"
        )
    if stats.truncated:
        warnings.append(f"{stats.truncated} records were truncated to {stats.max_seq_length} tokens")
    if stats.shared_prompts:
        warnings.append(
            f"{stats.shared_prompts} prompts occur in more than one split"
            + (
                " (the splits are the source's own, kept as given)"
                if stats.split_method.startswith("as given")
                else ""
            )
        )
    if stats.conflicting_labels:
        warnings.append(
            f"{stats.conflicting_labels} records repeat an earlier conversation with the opposite label; "
            "each later copy is left out (reason conflicting_label in rejected.jsonl): fix their labels"
        )
    if stats.group_by and stats.groups.get("(none)"):
        warnings.append(
            f"{stats.groups['(none)']} records have no {stats.group_by!r} field (group '(none)' in evaluation)"
        )
    if stats.dropped_chars:
        chars = ", ".join(f"{c} in {n} records" for c, n in stats.dropped_chars.items())
        warnings.append(
            f"the tokenizer's vocabulary has no token for some characters ({chars}): they are left out of "
            "the tokens, exactly as the model's own tokenizer leaves them out; remove them from the data "
            "if they matter"
        )
    if stats.tools is not None:  # tolerated tool defects (a call to a tool not defined): where, first few
        warnings += [f"{w.where} {w.reason}: {w.message}" for w in stats.tools.warning_examples[:3]]
    plot = folder / pipeline.LENGTHS_PNG
    return DatasetResult(
        name=name,
        version=version,
        path=str(folder),
        cache_hit=hit,
        source=spec,
        model=model,
        template=template,
        splits={s: str(split_path(folder, s)) for s in stats.splits},
        stats=stats,
        rejected_file=str(folder / pipeline.REJECTED),
        plot_file=str(plot) if plot.is_file() else None,
        warnings=warnings,
        notes=[stats.tools.note] if stats.tools is not None and stats.tools.note else [],
    )


# ---------------------------------------------------------------------------------- list/info/show
def _summary(ws: Workspace, row: dict[str, Any]) -> DatasetSummary:
    m = row["meta"]
    return DatasetSummary(
        name=row["name"],
        version=int(row["version"]),
        created_at=row["created_at"],
        source=row.get("source") or "",
        model=m.get("model", ""),
        records=m.get("records", {}),
        path=str(_folder(ws, row)),
    )


def list_datasets(ws: Workspace) -> DatasetList:
    rows = sorted(ws.registry().list(TABLE), key=lambda r: (r["name"], int(r["version"])))
    return DatasetList(datasets=[_summary(ws, r) for r in rows])


def _named(name: str, version: int | None) -> tuple[str, int | None]:
    """NAME and --version, or NAME@vN (both only when they agree)."""
    base, ref = parse_dataset_ref(name, "NAME")
    if ref is not None and version is not None and ref != version:
        raise FtError(ErrorCode.USAGE, f"{name} and --version {version} name different versions", "give one")
    return base, ref if ref is not None else version


def dataset_info(ws: Workspace, name: str, version: int | None = None) -> DatasetInfo:
    name, version = _named(name, version)
    resolved = resolve_dataset(ws, name, version)
    row = _row(ws, name, resolved.version)
    stats = DatasetStats.model_validate_json((resolved.path / pipeline.STATS).read_text(encoding="utf-8"))
    return DatasetInfo(
        summary=_summary(ws, row),
        manifest=resolved.manifest,
        stats=stats,
        versions=[int(r["version"]) for r in _rows(ws, name)],
    )


def show_dataset(
    ws: Workspace, name: str, split: str = "train", n: int = 3, start: int = 0, version: int | None = None
) -> ShowResult:
    """Records of a split decoded back to text, cut into trained / not-trained segments."""
    name, version = _named(name, version)
    resolved = resolve_dataset(ws, name, version)
    if split not in resolved.splits:
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"dataset {name} v{resolved.version} has no {split!r} split",
            f"splits: {', '.join(resolved.splits)}",
        )
    data = load_split(resolved.splits[split])
    model = resolved.manifest.get("tokenizer", {}).get("model", "")
    tok = load_tokenizer(_model_folder(ws, model), model)
    sources = resolved.manifest.get("sources", [])
    out = []
    for i in range(max(0, start), min(len(data), max(0, start) + max(0, n))):
        ids, mask = data.tokens(i), data.mask(i)
        segments: list[Segment] = []
        run_start = 0
        for j in range(1, len(ids) + 1):
            if j == len(ids) or mask[j] != mask[run_start]:
                segments.append(Segment(text=tok.decode(ids[run_start:j]), trained=bool(mask[run_start])))
                run_start = j
        out.append(
            ShownRecord(
                index=i,
                where=locate(sources, int(data.record_ids[i])),
                label=int(data.labels[i]),
                tokens=len(ids),
                trained_tokens=int(mask.sum()),
                segments=segments,
            )
        )
    return ShowResult(name=name, version=resolved.version, split=split, total=len(data), records=out)


def remove_dataset(ws: Workspace, name: str, version: int | None = None) -> RemoveResult:
    """Delete one version (or all versions) of a dataset: its folder and its registry rows.

    Without ``version`` it also removes what a failed or interrupted prepare left under NAME (a
    folder with no registered version, the last failure's report), even when NAME has no version.
    """
    name, version = _named(name, version)
    rows = [_row(ws, name, version)] if version is not None else _rows(ws, name)
    base = ws.dataset_dir(name)
    failed = _failed_dir(ws, name)
    leftovers = [p for p in (base, failed) if p.exists()] if version is None else []
    if not rows and not leftovers:
        _row(ws, name, None)  # raises the not-found error
    reg = ws.registry()
    removed = []
    for r in rows:
        folder = _folder(ws, r)
        if folder.is_dir() and ws.datasets_dir.resolve() in folder.parents:
            shutil.rmtree(folder)
        reg.delete(TABLE, name=name, version=r["version"])
        removed.append(int(r["version"]))
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    _drop_if_empty(ws.datasets_dir / FAILED)
    return RemoveResult(
        name=name,
        removed_versions=removed,
        removed_leftovers=[p.relative_to(ws.root).as_posix() for p in leftovers if not rows or p == failed],
    )


def check_tokenizer(manifest: dict[str, Any], dataset: str, model: str, model_dir: Path, hint: str) -> None:
    """Token ids only mean something with the tokenizer that made them: the one rule for train and evaluate.

    A dataset prepared for ``model`` fits; one prepared for another model fits only when both tokenizers
    have the same fingerprint (a dataset that recorded no fingerprint cannot show that, and is refused).
    A manifest without any tokenizer record (prepared by an early ft) is taken as it is.
    """
    tk = manifest.get("tokenizer") or {}
    if not tk or tk.get("model") == model:
        return
    if tk.get("fingerprint") != load_tokenizer(model_dir, model).fingerprint():
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"dataset {dataset} was tokenized for {tk.get('model')!r}, not for {model!r} (their tokenizers differ)",
            hint,
        )
