"""`ft dataset prepare`: options from the command line and train.yml, the cache, a new version folder.

Preparing the same source files with the same tokenizer and options again is a cache hit; anything
different makes a new version (``ft.services.datasets`` keeps the versions). A prepare that fails over
its records keeps its report in ``datasets/.failed/NAME/`` and creates no version.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ft import __version__
from ft.config.loader import load_config
from ft.config.train import TrainConfig
from ft.data import prepare as pipeline
from ft.data.formats import FORMAT_CHOICES, UNKNOWN_TOOL_CHOICES, load_tools
from ft.data.prepare import PrepareOptions, Progress, TooManyBadRecords
from ft.data.readers import Source, open_source
from ft.data.stats import DatasetStats
from ft.data.templates import TEMPLATE_CHOICES, make_template
from ft.data.tokenize import TRAIN_ON_CHOICES, TextTokenizer
from ft.data.validate import parse_max_bad
from ft.errors import ErrorCode, FtError
from ft.services.dataset_result import DatasetResult, with_version_notes
from ft.services.datasets import (
    MANIFEST,
    drop_if_empty,
    failed_dir,
    load_tokenizer,
    model_folder,
    next_version,
    reconcile,
    register,
    version_folder,
    version_row,
    version_rows,
)
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir, atomic_write_json, clean_leftovers

LABEL_CHOICES = ("sft-desirable", "all", "keep")
ON_LONG_CHOICES = ("truncate", "drop", "error")
# Bump when the prepared layout or pipeline changes meaning: old caches then miss.
PIPELINE_VERSION = 2  # 2: tool calls and tool results are rendered (they were rejected or dropped)
# The keys of train.yml's data section that `ft dataset prepare` also takes from its command line, with the
# option that sets each (messages name it).
DATA_OPTIONS = {
    "format": "--format",
    "template": "--template",
    "labels": "--labels",
    "val_split": "--val",
    "test_split": "--test",
    "train_on": "--train-on",
    "max_seq_length": "--max-seq-length",
    "on_long": "--on-long",
    "max_bad": "--max-bad",
    "tools": "--tools",
    "unknown_tool": "--unknown-tool",
    "stratify_by": "--stratify-by",
    "group_by": "--group-by",
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "format": FORMAT_CHOICES,
    "template": TEMPLATE_CHOICES,
    "labels": LABEL_CHOICES,
    "train_on": TRAIN_ON_CHOICES,
    "on_long": ON_LONG_CHOICES,
    "unknown_tool": UNKNOWN_TOOL_CHOICES,
}
# A given 0 is a value for these; for the other keys an empty value (0, "") means train.yml's too.
_ZERO_IS_A_VALUE = ("val_split", "test_split", "max_bad")


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
    model: str | None = None,
    data: Mapping[str, Any] | None = None,
    show_content: bool = False,
    hf_split: str | None = None,
    hf_config: str | None = None,
    overrides: list[str] | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> DatasetResult:
    """Prepare SOURCE (default: train.yml's data.path) for ``model`` (default: train.yml's model.name).

    ``data``: values of train.yml's data section (keys of :data:`DATA_OPTIONS`, e.g. ``{"labels": "keep"}``);
    a key left out or None is train.yml's (``overrides``: ``--set`` values on top of train.yml).
    """
    cfg = config or load_config(ws, overrides or []).config
    opts, template_name = _options(ws, cfg, data or {}, show_content)
    model_name = model or cfg.model.name
    spec = source or cfg.data.path
    # A SOURCE typed on the command line may be relative to where the user stands; train.yml's
    # data.path is relative to the workspace.
    given = Path(spec).expanduser() if source else None
    where = given.resolve() if given is not None and not given.is_absolute() and given.exists() else spec
    src = open_source(where, base=ws.root, hf_split=hf_split, hf_name=hf_config)
    name = validate_name(name or default_name(spec), "dataset name")

    tok = load_tokenizer(model_folder(ws, model_name), model_name)
    tmpl = make_template(template_name, tok.chat_template, tok.special, model_name)
    if progress:
        progress(Progress(bytes_total=src.total_bytes, stage="hashing"))
    identity = src.identity()
    key = _cache_key(identity, tok.fingerprint(), tmpl.source, opts)

    base = ws.dataset_dir(name)
    reconcile(ws, name, base)
    hit = _cache_hit(ws, name, key, opts)
    if hit is not None:
        return with_version_notes(ws, hit, identity)

    base.mkdir(parents=True, exist_ok=True)
    clean_leftovers(base)
    version = next_version(ws, name, base)
    try:
        while True:
            final = base / f"v{version}"
            try:
                with atomic_dir(final) as tmp:
                    stats = _run(src, tok, tmpl, opts, tmp, failed_dir(ws, name), progress)
                    manifest = _manifest(
                        name, version, spec, identity, src, model_name, tok, tmpl, opts, key, stats
                    )
                    atomic_write_json(tmp / MANIFEST, manifest)
                break
            except FileExistsError:
                version += 1  # another process took this version number meanwhile
    except BaseException:
        drop_if_empty(base)  # a first version that failed leaves no datasets/NAME/ behind
        raise
    shutil.rmtree(failed_dir(ws, name), ignore_errors=True)  # an old failure report is out of date
    register(ws, name, version, final, spec, manifest, stats)
    result = DatasetResult.of(version_row(ws, name, version), final, stats, cache_hit=False)
    return with_version_notes(ws, result, identity)


def prepare_from_config(
    ws: Workspace,
    config: TrainConfig,
    progress: Callable[[Progress], None] | None = None,
    name: str | None = None,
) -> DatasetResult:
    """Prepare train.yml's data.path with train.yml's options (a cache hit when already prepared)."""
    return prepare_dataset(ws, None, name=name, config=config, progress=progress)


def _options(
    ws: Workspace, cfg: TrainConfig, data: Mapping[str, Any], show_content: bool
) -> tuple[PrepareOptions, str]:
    """The pipeline's options and the template's name: each from ``data``, else from train.yml."""
    unknown = sorted(set(data) - set(DATA_OPTIONS))
    if unknown:
        raise TypeError(f"prepare_dataset: {', '.join(unknown)} is not a key of train.yml's data section")
    d = cfg.data

    def value(key: str) -> Any:
        given = data.get(key)
        empty = given is None if key in _ZERO_IS_A_VALUE else not given
        return getattr(d, key) if empty else given

    tools = data.get("tools")
    opts = PrepareOptions(
        format=_choice("format", value("format")),
        train_on=_choice("train_on", value("train_on")),
        labels=_choice("labels", value("labels")),
        val_split=value("val_split"),
        test_split=value("test_split"),
        seed=cfg.training.seed,
        max_seq_length=value("max_seq_length"),
        on_long=_choice("on_long", value("on_long")),
        show_content=show_content,
        stratify_by=_meta_key("stratify_by", value("stratify_by")),
        group_by=_meta_key("group_by", value("group_by")),
        max_bad=parse_max_bad(value("max_bad")),
        batch_size=cfg.training.batch_size,
        grad_accumulation_steps=cfg.training.grad_accumulation_steps,
        # --tools is relative to where the user stands, train.yml's data.tools to the workspace
        tools=load_tools(tools) if tools else (load_tools(ws.root / d.tools) if d.tools else None),
        unknown_tool=_choice("unknown_tool", value("unknown_tool")),
    )
    _check_fractions(opts)
    return opts, _choice("template", value("template"))


def _choice(key: str, value: str) -> str:
    option, choices = DATA_OPTIONS[key], _CHOICES[key]
    if value not in choices:
        raise FtError(
            ErrorCode.USAGE,
            f"{option} {value!r} is not one of {', '.join(choices)}",
            f"use one of: {', '.join(choices)}",
        )
    return value


def _meta_key(data_key: str, key: str | None) -> str | None:
    option = DATA_OPTIONS[data_key]
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


def _cache_hit(ws: Workspace, name: str, key: str, opts: PrepareOptions) -> DatasetResult | None:
    for row in reversed(version_rows(ws, name)):
        if row["meta"].get("cache_key") != key:
            continue
        folder = version_folder(ws, row)
        if not (folder / MANIFEST).is_file() or not (folder / pipeline.STATS).is_file():
            continue  # the folder was removed by hand: prepare again
        stats = DatasetStats.model_validate_json((folder / pipeline.STATS).read_text(encoding="utf-8"))
        if stats.bad_fraction > opts.max_bad + 1e-12:
            stats.max_bad = opts.max_bad
            raise TooManyBadRecords(stats, *pipeline.too_many_bad_message(stats))
        # Batch settings may have changed since: recompute the estimate, report the current threshold.
        pipeline.echo_settings(stats, opts)
        return DatasetResult.of(row, folder, stats, cache_hit=True)
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
