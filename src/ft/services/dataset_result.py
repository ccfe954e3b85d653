"""What `ft dataset prepare` tells the user: the result, its warnings, and notes about other versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ft.data.prepare import LENGTHS_PNG, REJECTED
from ft.data.stats import DatasetStats
from ft.data.store import split_path
from ft.services.datasets import MANIFEST, version_folder, version_rows
from ft.workspace import Workspace


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

    @classmethod
    def of(cls, row: dict[str, Any], folder: Path, stats: DatasetStats, cache_hit: bool) -> DatasetResult:
        """The result for the version registered as ``row`` (``cache_hit``: prepared before this call)."""
        meta = row["meta"]
        plot = folder / LENGTHS_PNG
        return cls(
            name=row["name"],
            version=int(row["version"]),
            path=str(folder),
            cache_hit=cache_hit,
            source=row.get("source") or "",
            model=meta.get("model", ""),
            template=meta.get("template", ""),
            splits={s: str(split_path(folder, s)) for s in stats.splits},
            stats=stats,
            rejected_file=str(folder / REJECTED),
            plot_file=str(plot) if plot.is_file() else None,
            warnings=_warnings(stats),
            notes=[stats.tools.note] if stats.tools is not None and stats.tools.note else [],
        )


def _warnings(stats: DatasetStats) -> list[str]:
    """What in the kept data deserves a look: dropped or cut records, shared prompts, odd labels."""
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
    return warnings


def _source_names(identity: list[dict[str, Any]]) -> str:
    shown = [str(i.get("display") or i.get("path") or "?") for i in identity[:3]]
    return ", ".join(shown) + (f" and {len(identity) - 3} more" if len(identity) > 3 else "")


def _content(identity: list[dict[str, Any]]) -> list[Any]:
    return sorted(str(i.get("sha256") or i.get("fingerprint") or i.get("path")) for i in identity)


def with_version_notes(ws: Workspace, r: DatasetResult, identity: list[dict[str, Any]]) -> DatasetResult:
    """Say how this version relates to the name's other versions, and how to train on exactly it."""
    rows = version_rows(ws, r.name)
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
        manifest = json.loads((version_folder(ws, prev) / MANIFEST).read_text(encoding="utf-8"))
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
