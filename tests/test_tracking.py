"""logging.tensorboard: a run's losses, learning rate and validation loss reach TensorBoard event files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from test_resume_support import make_workspace, settings, train_in_process


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TFRecord event files in ``folder``: tag -> [(step, value)]."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metrics_reach_tensorboard(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    res = train_in_process(ws, "tb", settings(steps=4, save=4, evals=2) + ["logging.tensorboard=true"])
    scalars = read_scalars(Path(res.path) / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["val/loss"]] == [0, 2, 4]
    logged = {r["step"]: r for r in _metrics(Path(res.metrics_file)) if r.get("type") == "train"}
    for step, value in scalars["train/loss"]:
        assert value == pytest.approx(logged[step]["avg_loss"], rel=1e-6)
    assert scalars["val/loss"][-1][1] == pytest.approx(res.final_val_loss, rel=1e-6)
    assert len(scalars["train/lr"]) == 4 and len(scalars["val/perplexity"]) == 3


def _metrics(path: Path) -> list[dict]:
    from ft.engine.callbacks import read_metrics

    return read_metrics(path)
