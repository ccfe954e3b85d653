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
from ft.data.readers import RawRecord, Source, describe
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
    fmt = None if opts.format == "auto" else Format(opts.format)
    stats = DatasetStats(
        max_bad=opts.max_bad,
        label_policy=opts.labels,
        on_long=opts.on_long,
        max_seq_length=opts.max_seq_length,
        batch_size=opts.batch_size,
        grad_accumulation_steps=opts.grad_accumulation_steps,
    )
    prog = Progress(bytes_total=source.total_bytes)
    dropped_before = template.text_dropped_turns if template is not None else 0
    pool = TokenPool(out_dir / ".pool")

    # Per kept record, in pool order; typed arrays hold 1-8 bytes per value (lists would hold ~36).
    labels = array("b")
    record_ids = array("q")
    groups = array("q")
    turns = array("l")
    trained = array("q")
    prompt_ids: dict[bytes, int] = {}
    seen: dict[bytes, int] = {}  # content digest -> record id of its first occurrence
    found_labels: Counter[int] = Counter()
    formats: Counter[str] = Counter()
    tool_stats = ToolStats()
    dropped_chars: Counter[str] = Counter()
    given = array("b")  # per kept record: its split code when the source gives splits
    given_codes = {name: code for code, name in splitmod.SPLIT_NAMES.items()}
    strat_values = array("q")  # per kept record: code of its --stratify-by value (0 = absent)
    strat_codes: dict[str, int] = {}
    group_counts: Counter[str | None] = Counter()
    labelled: dict[bytes, tuple[int, int]] = {}  # content digest -> (label, record id) of labelled records
    meta_file: IO[str] | None = None
    tool_sets = ToolSetWriter(out_dir)  # each kept record's tool definitions, for evaluation

    def bytes_read(n: int) -> None:
        prog.bytes_done += n

    def blank() -> None:
        stats.blank_lines += 1

    with (
        open(out_dir / REJECTED, "w", encoding="utf-8") as rejected_file,
        ThreadPoolExecutor(1, thread_name_prefix="ft-encode") as executor,
    ):
        st = _State(rejected_file, opts.show_content, stats)
        pending: list[tuple[RawRecord, int, Example]] = []

        in_flight: list[tuple[list[tuple[RawRecord, int, Example]], Callable[[], list[Any]]]] = []

        def flush(last: bool = False) -> None:
            # Start tokenizing this batch in the background, then finish the previous one (in order).
            if pending:
                batch = list(pending)
                pending.clear()
                in_flight.append(
                    (
                        batch,
                        start_encoding([ex for _, _, ex in batch], tok, template, opts.train_on, executor),
                    )
                )
            while in_flight and (last or len(in_flight) > 1):
                done, finish = in_flight.pop(0)
                _keep(done, finish())

        def _keep(batch: list[tuple[RawRecord, int, Example]], encoded: list[Any]) -> None:
            nonlocal meta_file
            for (rec, fidx, ex), enc in zip(batch, encoded, strict=True):
                kept = _fit(rec, enc, opts, st)
                if kept is None:
                    continue
                pool.append(kept.ids, kept.mask)
                rid = make_record_id(fidx, rec.line)
                labels.append(ex.label)
                record_ids.append(rid)
                groups.append(prompt_ids.setdefault(ex.prompt_key(), len(prompt_ids)))
                turns.append(ex.turns)
                trained.append(int(kept.mask.sum()))
                for c in kept.dropped:
                    dropped_chars[f"U+{ord(c):04X}"] += 1
                formats[ex.fmt.value] += 1
                tool_sets.add(rid, ex.tools)
                if ex.uses_tools:
                    _count_tools(tool_stats, ex, rec)
                if source.given_splits:
                    given.append(given_codes[source.files[fidx].split or "train"])
                if opts.stratify_by:
                    value = meta_text((ex.meta or {}).get(opts.stratify_by))
                    strat_values.append(
                        0 if value is None else strat_codes.setdefault(value, len(strat_codes) + 1)
                    )
                if opts.group_by:
                    group_counts[meta_text((ex.meta or {}).get(opts.group_by))] += 1
                if ex.meta:
                    if meta_file is None:
                        meta_file = open(out_dir / METADATA, "w", encoding="utf-8")  # noqa: SIM115
                    meta_file.write(
                        json.dumps({"record_id": rid, **ex.meta}, ensure_ascii=False, default=str) + "\n"
                    )
            prog.kept = len(labels)
            if progress:
                progress(prog)

        for fidx, rec in source.records(bytes_read, blank):
            prog.records += 1
            ex = _validate(rec, fmt, st, opts)
            if ex is None:
                continue
            found_labels[ex.label] += 1
            if ex.rejected is not None:
                found_labels[0] += 1  # a pair: its chosen side is desirable, its rejected side not
            if ex.label >= 0 and ex.rejected is None:
                # The same conversation labelled both ways: report it, keep only the first copy.
                key = ex.content_key()
                first_label, first_id = labelled.setdefault(key, (ex.label, make_record_id(fidx, rec.line)))
                if first_label != ex.label:
                    stats.conflicting_labels += 1
                    names = {1: "desirable", 0: "undesirable"}
                    st.reject(
                        _rejection(
                            rec,
                            Reason.CONFLICTING_LABEL,
                            f"labelled {names[ex.label]}, but the identical conversation at "
                            f"{_where(source, first_id)} is labelled {names[first_label]}",
                        )
                    )
                    continue
            if opts.labels == "sft-desirable" and ex.label == 0:
                stats.skipped_undesirable += 1
                continue
            if opts.dedupe:
                key = ex.content_key()
                first = seen.get(key)
                if first is not None:
                    st.reject(
                        _rejection(
                            rec, Reason.DUPLICATE, f"identical to the record at {_where(source, first)}"
                        )
                    )
                    continue
                seen[key] = make_record_id(fidx, rec.line)
            pending.extend((rec, fidx, side) for side in pair_sides(ex, opts.labels, stats))
            if len(pending) >= BATCH:
                flush()
        flush(last=True)
    seen.clear()
    labelled.clear()
    if meta_file is not None:
        meta_file.close()
    tool_sets.close()
    pool.finish()

    stats.records_read = prog.records
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
    stats.formats = dict(formats.most_common())
    if tool_stats.records:
        text_dropped = template.text_dropped_turns - dropped_before if template is not None else 0
        stats.tools = _tool_summary(tool_stats, template, text_dropped)
    stats.dropped_chars = dict(sorted(dropped_chars.items()))

    if too_many_bad(stats.bad, stats.records_read, opts.max_bad):
        pool.remove()
        _write_stats(out_dir, stats)
        raise TooManyBadRecords(stats, *too_many_bad_message(stats))
    if st.long_errors:
        pool.remove()
        _write_stats(out_dir, stats)
        shown = "; ".join(st.long_errors[:EXAMPLES_SHOWN])
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"{len(st.long_errors)} example(s) are longer than max_seq_length {opts.max_seq_length}: {shown}",
            "raise data.max_seq_length, or use --on-long drop|truncate",
        )
    if not labels:
        pool.remove()
        _write_stats(out_dir, stats)
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"no usable records in {source.spec} ({stats.records_read} read, {sum(st.counts.values())} rejected"
            + (f", {stats.skipped_undesirable} undesirable skipped" if stats.skipped_undesirable else "")
            + ")",
            f"see {out_dir.name}/{REJECTED} for every rejected record",
        )

    if progress:
        prog.stage = "splitting"
        progress(prog)
    lab = np.frombuffer(labels, dtype=np.int8).copy()
    grp = np.frombuffer(groups, dtype=np.int64).copy()
    if source.given_splits:
        assignment = np.frombuffer(given, dtype=np.int8).copy()
        parts = ", ".join(f"{f.display} -> {f.split}" for f in source.files)
        stats.split_method = f"as given by the source ({parts})" + (
            f"; left out: {', '.join(source.ignored)}" if source.ignored else ""
        )
    else:
        values = np.frombuffer(strat_values, dtype=np.int64) if opts.stratify_by else None
        strata = splitmod.strata(lab.astype(np.int64), values)
        assignment = splitmod.assign_splits(strata, grp, opts.val_split, opts.test_split, opts.seed)
        stats.split_method = (
            f"seeded (seed {opts.seed}), stratified by label"
            + (f" and {opts.stratify_by!r} ({len(strat_codes)} values)" if opts.stratify_by else "")
            + ", prompts kept in one split"
        )
        if opts.stratify_by:
            missing = int(np.count_nonzero(values == 0)) if values is not None else 0
            if missing:
                stats.split_method += f"; {missing} records have no {opts.stratify_by!r} (one stratum)"
    if opts.group_by:
        stats.group_by = opts.group_by
        stats.groups = {("(none)" if k is None else k): v for k, v in group_counts.most_common()}
    stats.shared_prompts = splitmod.shared_prompts(
        [int(g).to_bytes(8, "little") for g in grp.tolist()], assignment
    )
    group_sizes = np.bincount(grp)
    stats.grouped_records = int(np.count_nonzero(group_sizes[grp] > 1))

    stored_labels = lab if opts.labels != "all" else np.full_like(lab, -1)
    rids = np.asarray(record_ids, dtype=np.int64)
    lengths = np.frombuffer(pool.lengths, dtype=np.int64) if len(pool.lengths) else np.zeros(0, np.int64)
    trained_arr = np.asarray(trained, dtype=np.int64)
    lengths_by_split: dict[str, np.ndarray] = {}
    for code, name in splitmod.SPLIT_NAMES.items():
        idx = np.flatnonzero(assignment == code)
        if code != splitmod.TRAIN and len(idx) == 0:
            continue
        write_split(
            split_path(out_dir, name),
            pool,
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
    pool.remove()
    (out_dir / ".pool").rmdir()

    stats.kept = len(labels)
    stats.turns = turn_stats(np.asarray(turns, dtype=np.int64))
    stats.lengths = LengthStats.of(lengths)
    stats.histogram = Histogram.of(lengths)
    stats.trainable_tokens = stats.splits["train"].trained_tokens
    stats.steps_per_epoch = steps_per_epoch(
        stats.splits["train"].records, opts.batch_size, opts.grad_accumulation_steps
    )
    plot_lengths(
        out_dir / LENGTHS_PNG,
        lengths_by_split,
        opts.max_seq_length,
        f"Token lengths of {stats.kept:,} examples",
    )
    _write_stats(out_dir, stats)
    return stats


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
