"""The preparation pipeline: source -> validated examples -> tokens + loss mask -> splits on disk.

One streaming pass reads, validates, filters (labels, duplicates), tokenizes in batches and appends
kept examples to a scratch pool on disk, holding only a few small numbers per record in memory.
Then the split is chosen (stratified, prompt-disjoint) and each split is written as one
memory-mappable safetensors file, with stats.json, rejected.jsonl and lengths.png beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ft.data import split as splitmod
from ft.data.formats import Example, Format, normalize
from ft.data.readers import RawRecord, ReadHooks, Source, describe
from ft.data.stats import (
    DatasetStats,
    Histogram,
    LengthStats,
    RejectedExample,
    SplitStats,
    ToolStats,
    label_counts,
    plot_lengths,
    steps_per_epoch,
    turn_stats,
)
from ft.data.store import (
    METADATA,
    TokenPool,
    make_record_id,
    meta_text,
    split_path,
    split_record_id,
    write_split,
)
from ft.data.templates import ChatTemplate
from ft.data.tokenize import Encoded, FastPathMismatch, TextTokenizer, start_encoding
from ft.data.tool_store import ToolSetWriter
from ft.data.validate import BAD_REASONS, HINTS, Reason, RecordError, Rejection, location, too_many_bad
from ft.errors import ErrorCode, FtError

REJECTED = "rejected.jsonl"
STATS = "stats.json"
LENGTHS_PNG = "lengths.png"
EXAMPLES_SHOWN = 5
BATCH = 1024


@dataclass(frozen=True)
class PrepareOptions:
    """How a source becomes a dataset. Everything here except the last group changes the output."""

    format: str = "auto"
    train_on: str = "assistant"
    labels: str = "sft-desirable"
    val_split: float = 0.2
    test_split: float = 0.0
    seed: int = 42
    max_seq_length: int = 2048
    on_long: str = "drop"
    dedupe: bool = True
    show_content: bool = False
    # Dataset-level tool definitions (ft.data.formats.load_tools of --tools FILE) for records without their
    # own 'tools'; a call to a tool missing from the definitions: "warn" (kept) or "error" (rejected).
    tools: tuple[dict[str, Any], ...] | None = None
    unknown_tool: str = "warn"
    stratify_by: str | None = None  # a metadata key: splits stratified by (label, its value)
    group_by: str | None = None  # a metadata key evaluation reports per value of (recorded in the manifest)
    # Not part of the output (checked or recomputed on a cache hit):
    max_bad: float = 0.05
    batch_size: int | None = None
    grad_accumulation_steps: int | None = None

    def output_options(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("max_bad", "batch_size", "grad_accumulation_steps"):
            d.pop(k)
        if self.tools is not None:  # the manifest and cache key hold a digest, not the whole list
            text = json.dumps(self.tools, sort_keys=True, ensure_ascii=False)
            d["tools"] = {"count": len(self.tools), "sha256": hashlib.sha256(text.encode()).hexdigest()}
        return d


@dataclass
class Progress:
    """Reported while preparing: bytes of the source read so far, records seen and kept."""

    bytes_done: int = 0
    bytes_total: int = 0
    records: int = 0
    kept: int = 0
    stage: str = "reading"


class TooManyBadRecords(FtError):
    """More invalid records than --max-bad allows; carries the statistics for the report."""

    def __init__(self, stats: DatasetStats, message: str, hint: str):
        super().__init__(ErrorCode.DATA_TOO_MANY_BAD, message, hint)
        self.stats = stats


@dataclass
class _State:
    rejected_file: IO[str]
    show_content: bool
    stats: DatasetStats
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[RejectedExample] = field(default_factory=list)
    long_errors: list[str] = field(default_factory=list)

    def reject(self, rej: Rejection) -> None:
        self.counts[rej.reason.value] += 1
        if len(self.examples) < EXAMPLES_SHOWN:
            self.examples.append(
                RejectedExample(where=rej.where, reason=rej.reason.value, message=rej.message)
            )
        self.rejected_file.write(
            json.dumps(rej.to_json(self.show_content), ensure_ascii=False, default=str) + "\n"
        )


def prepare(
    source: Source,
    tok: TextTokenizer,
    template: ChatTemplate | None,
    opts: PrepareOptions,
    out_dir: Path,
    progress: Callable[[Progress], None] | None = None,
) -> DatasetStats:
    """Prepare ``source`` into ``out_dir`` (an empty folder); returns the statistics (also in stats.json).

    Raises :class:`TooManyBadRecords` (after writing rejected.jsonl and stats.json) when invalid
    records exceed ``opts.max_bad``, and FtError when ``on_long="error"`` meets a long example.
    """
    try:
        return _prepare(source, tok, template, opts, Path(out_dir), progress)
    except FastPathMismatch:
        # The fast encoder disagreed with the reference tokenizer on a sampled record: it is now off
        # for this tokenizer; start over so that every example is encoded by the reference.
        for p in Path(out_dir).iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return _prepare(source, tok, template, opts, Path(out_dir), progress)


def _prepare(
    source: Source,
    tok: TextTokenizer,
    template: ChatTemplate | None,
    opts: PrepareOptions,
    out_dir: Path,
    progress: Callable[[Progress], None] | None,
) -> DatasetStats:
    """Read -> validate and filter -> tokenize into a pool (one pass) -> split -> write the splits and stats."""
    stats = DatasetStats(label_policy=opts.labels, on_long=opts.on_long, max_seq_length=opts.max_seq_length)
    echo_settings(stats, opts)
    prog = Progress(bytes_total=source.total_bytes)
    dropped_before = template.text_dropped_turns if template is not None else 0
    kept = _Kept(source, opts, out_dir)
    with open(out_dir / REJECTED, "w", encoding="utf-8") as rejected_file:
        st = _State(rejected_file, opts.show_content, stats)
        found_labels = _read(source, tok, template, opts, st, kept, prog, progress)
    kept.close()

    stats.records_read = prog.records
    _count_records(stats, st, found_labels, kept, opts)
    if kept.tool_stats.records:
        text_dropped = template.text_dropped_turns - dropped_before if template is not None else 0
        stats.tools = _tool_summary(kept.tool_stats, template, text_dropped)
    _refuse_unusable(source, opts, out_dir, st, kept)

    if progress:
        prog.stage = "splitting"
        progress(prog)
    assignment = _split(source, opts, stats, kept)
    lengths_by_split = _write_splits(out_dir, opts, stats, kept, assignment)
    _finish_stats(opts, stats, kept)
    plot_lengths(
        out_dir / LENGTHS_PNG,
        lengths_by_split,
        opts.max_seq_length,
        f"Token lengths of {stats.kept:,} examples",
    )
    _write_stats(out_dir, stats)
    return stats


# ------------------------------------------------------------------------ read, validate, filter
def _read(
    source: Source,
    tok: TextTokenizer,
    template: ChatTemplate | None,
    opts: PrepareOptions,
    st: _State,
    kept: _Kept,
    prog: Progress,
    progress: Callable[[Progress], None] | None,
) -> Counter[int]:
    """One streaming pass: every record read, validated, filtered, tokenized and fitted into ``kept``.

    Returns the labels found on the valid records (before the label policy).
    """
    fmt = None if opts.format == "auto" else Format(opts.format)
    admission = _Admission(source, opts, st)

    def bytes_read(n: int) -> None:
        prog.bytes_done += n

    def blank() -> None:
        st.stats.blank_lines += 1

    def keep(batch: _Batch, encoded: list[Any]) -> None:
        for (rec, fidx, ex), enc in zip(batch, encoded, strict=True):
            fitted = _fit(rec, enc, opts, st)
            if fitted is not None:
                kept.add(rec, fidx, ex, fitted)
        prog.kept = len(kept.labels)
        if progress:
            progress(prog)

    with ThreadPoolExecutor(1, thread_name_prefix="ft-encode") as executor:
        encoder = _Encoder(tok, template, opts.train_on, executor, keep)
        for fidx, rec in source.records(ReadHooks(bytes_read, blank)):
            prog.records += 1
            ex = _validate(rec, fmt, st, opts)
            if ex is not None:
                encoder.add([(rec, fidx, side) for side in admission.sides(rec, fidx, ex)])
        encoder.flush(last=True)
    return admission.found_labels


class _Admission:
    """Which valid records go on to tokenizing: label conflicts, the label policy, duplicates."""

    def __init__(self, source: Source, opts: PrepareOptions, st: _State):
        self.source, self.opts, self.st = source, opts, st
        self.seen: dict[bytes, int] = {}  # content digest -> record id of its first occurrence
        # content digest -> (label, record id) of labelled records
        self.labelled: dict[bytes, tuple[int, int]] = {}
        self.found_labels: Counter[int] = Counter()

    def sides(self, rec: RawRecord, fidx: int, ex: Example) -> list[Example]:
        """The examples ``ex`` becomes (both sides of a pair), or none when it is left out."""
        stats = self.st.stats
        self.found_labels[ex.label] += 1
        if ex.rejected is not None:
            self.found_labels[0] += 1  # a pair: its chosen side is desirable, its rejected side not
        if ex.label >= 0 and ex.rejected is None:
            # The same conversation labelled both ways: report it, keep only the first copy.
            key = ex.content_key()
            first_label, first_id = self.labelled.setdefault(key, (ex.label, make_record_id(fidx, rec.line)))
            if first_label != ex.label:
                stats.conflicting_labels += 1
                names = {1: "desirable", 0: "undesirable"}
                self.st.reject(
                    _rejection(
                        rec,
                        Reason.CONFLICTING_LABEL,
                        f"labelled {names[ex.label]}, but the identical conversation at "
                        f"{_where(self.source, first_id)} is labelled {names[first_label]}",
                    )
                )
                return []
        if self.opts.labels == "sft-desirable" and ex.label == 0:
            stats.skipped_undesirable += 1
            return []
        if self.opts.dedupe:
            key = ex.content_key()
            first = self.seen.get(key)
            if first is not None:
                self.st.reject(
                    _rejection(
                        rec, Reason.DUPLICATE, f"identical to the record at {_where(self.source, first)}"
                    )
                )
                return []
            self.seen[key] = make_record_id(fidx, rec.line)
        return pair_sides(ex, self.opts.labels, stats)


_Batch = list[tuple[RawRecord, int, Example]]


class _Encoder:
    """Tokenizes batches of examples in a background thread, one batch ahead, finishing them in order."""

    def __init__(
        self,
        tok: TextTokenizer,
        template: ChatTemplate | None,
        train_on: str,
        executor: ThreadPoolExecutor,
        finish: Callable[[_Batch, list[Any]], None],
    ):
        self.tok, self.template, self.train_on, self.executor = tok, template, train_on, executor
        self.finish = finish
        self.pending: _Batch = []
        self.in_flight: list[tuple[_Batch, Callable[[], list[Any]]]] = []

    def add(self, items: _Batch) -> None:
        self.pending.extend(items)
        if len(self.pending) >= BATCH:
            self.flush()

    def flush(self, last: bool = False) -> None:
        # Start tokenizing this batch in the background, then finish the previous one (in order).
        if self.pending:
            batch = list(self.pending)
            self.pending.clear()
            examples = [ex for _, _, ex in batch]
            self.in_flight.append(
                (batch, start_encoding(examples, self.tok, self.template, self.train_on, self.executor))
            )
        while self.in_flight and (last or len(self.in_flight) > 1):
            done, encoded = self.in_flight.pop(0)
            self.finish(done, encoded())


class _Kept:
    """The kept examples: tokens in a scratch pool on disk, a few small numbers each in memory."""

    def __init__(self, source: Source, opts: PrepareOptions, out_dir: Path):
        self.source, self.opts, self.out_dir = source, opts, out_dir
        self.pool = TokenPool(out_dir / ".pool")
        # Per kept record, in pool order; typed arrays hold 1-8 bytes per value (lists would hold ~36).
        self.labels = array("b")
        self.record_ids = array("q")
        self.groups = array("q")
        self.turns = array("l")
        self.trained = array("q")
        self.given = array("b")  # its split code when the source gives splits
        self.strat_values = array("q")  # code of its --stratify-by value (0 = absent)
        self.prompt_ids: dict[bytes, int] = {}
        self.strat_codes: dict[str, int] = {}
        self.formats: Counter[str] = Counter()
        self.dropped_chars: Counter[str] = Counter()
        self.group_counts: Counter[str | None] = Counter()
        self.tool_stats = ToolStats()
        self.tool_sets = ToolSetWriter(out_dir)  # each kept record's tool definitions, for evaluation
        self.meta_file: IO[str] | None = None
        self._given_codes = {name: code for code, name in splitmod.SPLIT_NAMES.items()}

    def add(self, rec: RawRecord, fidx: int, ex: Example, enc: Encoded) -> None:
        opts = self.opts
        self.pool.append(enc.ids, enc.mask)
        rid = make_record_id(fidx, rec.line)
        self.labels.append(ex.label)
        self.record_ids.append(rid)
        self.groups.append(self.prompt_ids.setdefault(ex.prompt_key(), len(self.prompt_ids)))
        self.turns.append(ex.turns)
        self.trained.append(int(enc.mask.sum()))
        for c in enc.dropped:
            self.dropped_chars[f"U+{ord(c):04X}"] += 1
        self.formats[ex.fmt.value] += 1
        self.tool_sets.add(rid, ex.tools)
        if ex.uses_tools:
            _count_tools(self.tool_stats, ex, rec)
        if self.source.given_splits:
            self.given.append(self._given_codes[self.source.files[fidx].split or "train"])
        if opts.stratify_by:
            value = meta_text((ex.meta or {}).get(opts.stratify_by))
            codes = self.strat_codes
            self.strat_values.append(0 if value is None else codes.setdefault(value, len(codes) + 1))
        if opts.group_by:
            self.group_counts[meta_text((ex.meta or {}).get(opts.group_by))] += 1
        if ex.meta:
            if self.meta_file is None:
                self.meta_file = open(self.out_dir / METADATA, "w", encoding="utf-8")  # noqa: SIM115
            self.meta_file.write(
                json.dumps({"record_id": rid, **ex.meta}, ensure_ascii=False, default=str) + "\n"
            )

    def close(self) -> None:
        if self.meta_file is not None:
            self.meta_file.close()
        self.tool_sets.close()
        self.pool.finish()


# ----------------------------------------------------------------------------- count and check
def _count_records(
    stats: DatasetStats, st: _State, found_labels: Counter[int], kept: _Kept, opts: PrepareOptions
) -> None:
    stats.rejected = dict(sorted(st.counts.items(), key=lambda kv: -kv[1]))
    stats.rejected_examples = st.examples
    stats.bad = sum(c for r, c in st.counts.items() if Reason(r) in BAD_REASONS)
    stats.bad_fraction = round(stats.bad / stats.records_read, 6) if stats.records_read else 0.0
    stats.labels_found = {
        "desirable": found_labels[1],
        "undesirable": found_labels[0],
        "unlabelled": found_labels[-1],
    }
    stats.label_note = label_note(opts.labels, found_labels[1], found_labels[0])
    stats.formats = dict(kept.formats.most_common())
    stats.dropped_chars = dict(sorted(kept.dropped_chars.items()))


def _refuse_unusable(source: Source, opts: PrepareOptions, out_dir: Path, st: _State, kept: _Kept) -> None:
    """Too many invalid records, a long one under --on-long error, or none kept: stats.json, then an error."""
    stats = st.stats
    error: FtError | None = None
    if too_many_bad(stats.bad, stats.records_read, opts.max_bad):
        error = TooManyBadRecords(stats, *too_many_bad_message(stats))
    elif st.long_errors:
        shown = "; ".join(st.long_errors[:EXAMPLES_SHOWN])
        error = FtError(
            ErrorCode.DATA_INVALID,
            f"{len(st.long_errors)} example(s) are longer than max_seq_length {opts.max_seq_length}: {shown}",
            "raise data.max_seq_length, or use --on-long drop|truncate",
        )
    elif not kept.labels:
        error = FtError(
            ErrorCode.DATA_INVALID,
            f"no usable records in {source.spec} ({stats.records_read} read, {sum(st.counts.values())} rejected"
            + (f", {stats.skipped_undesirable} undesirable skipped" if stats.skipped_undesirable else "")
            + ")",
            f"see {out_dir.name}/{REJECTED} for every rejected record",
        )
    if error is not None:
        kept.pool.remove()
        _write_stats(out_dir, stats)
        raise error


# --------------------------------------------------------------------------------- split, write
def _split(source: Source, opts: PrepareOptions, stats: DatasetStats, kept: _Kept) -> np.ndarray:
    """Each kept example's split code: as the source gives them, or seeded, stratified, prompt-disjoint."""
    lab = np.frombuffer(kept.labels, dtype=np.int8).copy()
    grp = np.frombuffer(kept.groups, dtype=np.int64).copy()
    if source.given_splits:
        assignment = np.frombuffer(kept.given, dtype=np.int8).copy()
        parts = ", ".join(f"{f.display} -> {f.split}" for f in source.files)
        stats.split_method = f"as given by the source ({parts})" + (
            f"; left out: {', '.join(source.ignored)}" if source.ignored else ""
        )
    else:
        values = np.frombuffer(kept.strat_values, dtype=np.int64) if opts.stratify_by else None
        strata = splitmod.strata(lab.astype(np.int64), values)
        assignment = splitmod.assign_splits(strata, grp, opts.val_split, opts.test_split, opts.seed)
        stats.split_method = (
            f"seeded (seed {opts.seed}), stratified by label"
            + (f" and {opts.stratify_by!r} ({len(kept.strat_codes)} values)" if opts.stratify_by else "")
            + ", prompts kept in one split"
        )
        if opts.stratify_by:
            missing = int(np.count_nonzero(values == 0)) if values is not None else 0
            if missing:
                stats.split_method += f"; {missing} records have no {opts.stratify_by!r} (one stratum)"
    if opts.group_by:
        stats.group_by = opts.group_by
        stats.groups = {("(none)" if k is None else k): v for k, v in kept.group_counts.most_common()}
    stats.shared_prompts = splitmod.shared_prompts(
        [int(g).to_bytes(8, "little") for g in grp.tolist()], assignment
    )
    group_sizes = np.bincount(grp)
    stats.grouped_records = int(np.count_nonzero(group_sizes[grp] > 1))
    return assignment


def _write_splits(
    out_dir: Path, opts: PrepareOptions, stats: DatasetStats, kept: _Kept, assignment: np.ndarray
) -> dict[str, np.ndarray]:
    """One safetensors file per split (train always, val and test when they have records); their lengths."""
    lab = np.frombuffer(kept.labels, dtype=np.int8).copy()
    stored_labels = lab if opts.labels != "all" else np.full_like(lab, -1)
    rids = np.asarray(kept.record_ids, dtype=np.int64)
    lengths = kept.pool.length_array()
    trained_arr = np.asarray(kept.trained, dtype=np.int64)
    lengths_by_split: dict[str, np.ndarray] = {}
    for code, name in splitmod.SPLIT_NAMES.items():
        idx = np.flatnonzero(assignment == code)
        if code != splitmod.TRAIN and len(idx) == 0:
            continue
        write_split(
            split_path(out_dir, name),
            kept.pool,
            idx,
            stored_labels[idx],
            rids[idx],
            metadata={"split": name, "mask": "1 = training target"},
        )
        sl = lengths[idx]
        lengths_by_split[name] = sl
        stats.splits[name] = SplitStats(
            records=len(idx),
            tokens=int(sl.sum()),
            trained_tokens=int(trained_arr[idx].sum()),
            labels=label_counts(lab[idx]),
            desirable_ratio=_ratio(lab[idx]),
            lengths=LengthStats.of(sl),
        )
    return lengths_by_split


def _finish_stats(opts: PrepareOptions, stats: DatasetStats, kept: _Kept) -> None:
    """The whole-dataset numbers; the scratch pool is removed."""
    lengths = kept.pool.length_array()
    kept.pool.remove()
    (kept.out_dir / ".pool").rmdir()
    stats.kept = len(kept.labels)
    stats.turns = turn_stats(np.asarray(kept.turns, dtype=np.int64))
    stats.lengths = LengthStats.of(lengths)
    stats.histogram = Histogram.of(lengths)
    stats.trainable_tokens = stats.splits["train"].trained_tokens
    echo_settings(stats, opts)


def echo_settings(stats: DatasetStats, opts: PrepareOptions) -> None:
    """Put into ``stats`` the settings that do not change the prepared data (a cache hit puts the current
    ones): max_bad, the batch settings, and the optimizer steps per epoch they give once the train split is known.
    """
    stats.max_bad = opts.max_bad
    stats.batch_size, stats.grad_accumulation_steps = opts.batch_size, opts.grad_accumulation_steps
    if "train" in stats.splits:
        stats.steps_per_epoch = steps_per_epoch(
            stats.splits["train"].records, opts.batch_size, opts.grad_accumulation_steps
        )


def _where(source: Source, record_id: int) -> str:
    fidx, line = split_record_id(record_id)
    if source.files:
        return location(source.files[fidx].display, source.units.get(fidx, "line"), line)
    return location(source.spec, "row", line)


def pair_sides(ex: Example, labels: str, stats: DatasetStats) -> list[Example]:
    """A paired record becomes two examples with the same record id, stored next to each other: the
    chosen conversation (label 1) then the rejected one (label 0). With --labels sft-desirable only the
    chosen one is kept (SFT on the preferred replies). Any other record is itself."""
    if ex.rejected is None:
        return [ex]
    chosen = dataclasses.replace(ex, rejected=None, label=1)
    if labels == "sft-desirable":
        stats.skipped_undesirable += 1
        return [chosen]
    return [chosen, dataclasses.replace(ex, messages=ex.rejected, rejected=None, label=0)]


def _validate(rec: RawRecord, fmt: Format | None, st: _State, opts: PrepareOptions) -> Example | None:
    if rec.error is not None:
        st.reject(_rejection(rec, rec.error[0], rec.error[1], rec.raw))
        return None
    try:
        return normalize(rec.obj, fmt, tools=opts.tools, unknown_tool=opts.unknown_tool)
    except RecordError as e:
        st.reject(_rejection(rec, e.reason, e.message, rec.obj))
        return None


def _count_tools(ts: ToolStats, ex: Example, rec: RawRecord) -> None:
    ts.records += 1
    calls = ex.tool_calls
    ts.calls += calls
    ts.results += sum(1 for m in ex.messages or () if m["role"] == "tool")
    if calls and not ex.tools:
        ts.without_definitions += 1
    for w in ex.warnings:
        ts.warnings[w.reason.value] = ts.warnings.get(w.reason.value, 0) + 1
        if len(ts.warning_examples) < EXAMPLES_SHOWN:
            ts.warning_examples.append(
                RejectedExample(where=describe(rec), reason=w.reason.value, message=w.message)
            )


def _tool_summary(ts: ToolStats, template: ChatTemplate | None, text_dropped: int = 0) -> ToolStats:
    """Say how the tool records were rendered (the model's template, or ft's fallback) and what was not checked."""
    native = template is not None and template.renders_tools
    ts.rendering = "template" if native else "fallback"
    ts.style = template.tool_style if template is not None else ""
    parts = [f"{ts.records:,} records use tools ({ts.calls:,} calls, {ts.results:,} results)"]
    if native:
        parts.append(f"rendered by the model's chat template ({ts.style} style)")
    else:
        parts.append(
            "the model's chat template has no tool support, so ft's fallback renders them: tools listed in the "
            "system turn, calls as <tool_call>{json}</tool_call> in the assistant turn, results as a user turn "
            "(docs/datasets.md)"
        )
    if text_dropped:
        ts.text_not_rendered = text_dropped
        parts.append(
            f"in {text_dropped:,} assistant turns the template does not render the text next to the tool "
            "calls (its format has none): that text is not trained"
        )
    if ts.without_definitions:
        parts.append(
            f"{ts.without_definitions:,} records call tools without any tool definitions: their calls were "
            "not checked against a tool list (give them 'tools', or --tools FILE)"
        )
    if ts.warnings.get("unknown_tool"):
        parts.append(
            f"{ts.warnings['unknown_tool']:,} calls name a tool missing from the definitions "
            "(kept; --unknown-tool error rejects them)"
        )
    ts.note = "; ".join(parts)
    return ts


def _fit(rec: RawRecord, enc: Encoded | RecordError, opts: PrepareOptions, st: _State) -> Encoded | None:
    """Apply the over-length policy; None when the record is dropped."""
    if isinstance(enc, RecordError):
        st.reject(_rejection(rec, enc.reason, enc.message, rec.obj))
        return None
    n = len(enc.ids)
    if n > opts.max_seq_length:
        msg = f"{n} tokens > max_seq_length {opts.max_seq_length}"
        if opts.on_long == "error":
            st.long_errors.append(f"{describe(rec)} ({n} tokens)")
            return None
        if opts.on_long == "drop":
            st.reject(_rejection(rec, Reason.TOO_LONG, msg, rec.obj))
            return None
        enc = Encoded(enc.ids[: opts.max_seq_length], enc.mask[: opts.max_seq_length], enc.dropped)
        if not enc.mask.any():
            st.reject(
                _rejection(rec, Reason.TOO_LONG, msg + "; truncating would leave no trained tokens", rec.obj)
            )
            return None
        st.stats.truncated += 1
    if not enc.mask.any():
        st.reject(
            _rejection(rec, Reason.TEMPLATE_ERROR, "no token of the reply survived tokenization", rec.obj)
        )
        return None
    return enc


def _rejection(rec: RawRecord, reason: Reason, message: str, content: Any = None) -> Rejection:
    return Rejection(rec.source, rec.line, rec.unit, reason, message, content)


def _ratio(labels: np.ndarray) -> float | None:
    known = labels[labels >= 0]
    return round(float((known == 1).mean()), 4) if len(known) else None


def _write_stats(out_dir: Path, stats: DatasetStats) -> None:
    (out_dir / STATS).write_text(json.dumps(stats.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")


def label_note(policy: str, desirable: int, undesirable: int) -> str:
    """One plain sentence about what the label policy did."""
    if desirable + undesirable == 0:
        return "no labels in the data: every valid record is used"
    found = f"labels: {desirable:,} desirable, {undesirable:,} undesirable"
    if policy == "sft-desirable":
        return (
            f"{found}; SFT trains on the {desirable:,} desirable records only "
            "(--labels all to train on both, --labels keep to keep both for preference training)"
        )
    if policy == "all":
        return f"{found}; labels ignored (--labels all): SFT trains on both"
    return f"{found}; both kept with their labels (--labels keep)"


def too_many_bad_message(stats: DatasetStats) -> tuple[str, str]:
    by_reason = ", ".join(f"{r} {c}" for r, c in stats.rejected.items() if Reason(r) in BAD_REASONS)
    first = "; ".join(f"{e.where} {e.reason}: {e.message}" for e in stats.rejected_examples[:3])
    msg = (
        f"{stats.bad} of {stats.records_read} records are invalid ({stats.bad_fraction:.1%}), more than "
        f"--max-bad {stats.max_bad:.1%} allows ({by_reason}). First: {first}"
    )
    top = next((Reason(r) for r in stats.rejected if Reason(r) in BAD_REASONS), None)
    hint = (
        HINTS.get(top, "") + "; " if top else ""
    ) + "fix the records listed in rejected.jsonl, or raise --max-bad"
    return msg, hint
