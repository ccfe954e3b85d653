"""Looking at prepared datasets: `ft dataset list|info|show`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ft.data.prepare import STATS
from ft.data.stats import DatasetStats
from ft.data.store import load_split, locate
from ft.errors import ErrorCode, FtError
from ft.services.datasets import (
    TABLE,
    load_tokenizer,
    model_folder,
    named_version,
    resolve_dataset,
    version_folder,
    version_row,
    version_rows,
)
from ft.workspace import Workspace


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


def _summary(ws: Workspace, row: dict[str, Any]) -> DatasetSummary:
    m = row["meta"]
    return DatasetSummary(
        name=row["name"],
        version=int(row["version"]),
        created_at=row["created_at"],
        source=row.get("source") or "",
        model=m.get("model", ""),
        records=m.get("records", {}),
        path=str(version_folder(ws, row)),
    )


def list_datasets(ws: Workspace) -> DatasetList:
    rows = sorted(ws.registry().list(TABLE), key=lambda r: (r["name"], int(r["version"])))
    return DatasetList(datasets=[_summary(ws, r) for r in rows])


def dataset_info(ws: Workspace, name: str, version: int | None = None) -> DatasetInfo:
    name, version = named_version(name, version)
    resolved = resolve_dataset(ws, name, version)
    row = version_row(ws, name, resolved.version)
    stats = DatasetStats.model_validate_json((resolved.path / STATS).read_text(encoding="utf-8"))
    return DatasetInfo(
        summary=_summary(ws, row),
        manifest=resolved.manifest,
        stats=stats,
        versions=[int(r["version"]) for r in version_rows(ws, name)],
    )


def show_dataset(
    ws: Workspace, name: str, split: str = "train", n: int = 3, start: int = 0, version: int | None = None
) -> ShowResult:
    """Records of a split decoded back to text, cut into trained / not-trained segments."""
    name, version = named_version(name, version)
    resolved = resolve_dataset(ws, name, version)
    if split not in resolved.splits:
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"dataset {name} v{resolved.version} has no {split!r} split",
            f"splits: {', '.join(resolved.splits)}",
        )
    data = load_split(resolved.splits[split])
    model = resolved.manifest.get("tokenizer", {}).get("model", "")
    tok = load_tokenizer(model_folder(ws, model), model)
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
