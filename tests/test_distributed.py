"""Data parallelism on this machine's CPU with MLX's ring backend: 2 ranks x half of every step equal
1 process x the whole step (losses, validation losses and final adapters within 1e-5 in float32)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ft.services.launch import launch_local

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(tmp: Path, name: str, packing: str, nproc: int) -> dict[int, dict[str, np.ndarray]]:
    out = tmp / name
    cmd = [sys.executable, str(WORKER), str(out), packing]
    if nproc == 1:
        import subprocess

        assert subprocess.call(cmd) == 0
    else:
        assert launch_local(cmd, nproc, backend="ring", log_dir=tmp / f"{name}-logs") == 0
    return {r: dict(np.load(f"{out}.rank{r}.npz")) for r in range(nproc)}


@pytest.mark.parametrize("packing", ["on", "off"])
def test_two_ranks_equal_one_process(tmp_path: Path, packing: str) -> None:
    one = _run(tmp_path, "one", packing, 1)[0]
    two = _run(tmp_path, "two", packing, 2)
    assert len(one["losses"]) == 10 and len(one["val"]) == 3  # evaluations at 0, 5 and 10
    for rank in (0, 1):
        got = two[rank]
        np.testing.assert_allclose(got["losses"], one["losses"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["val"], one["val"], atol=1e-5, rtol=0)
        weights = [k for k in one if k not in ("losses", "val") and not k.startswith("init:")]
        assert weights
        for k in weights:
            np.testing.assert_allclose(got[k], one[k], atol=1e-5, rtol=0, err_msg=k)
            # every rank holds the same weights after each step (here: after the last)
            np.testing.assert_array_equal(two[0][k], two[1][k], err_msg=k)
    # the adapters really moved (equal untouched weights would pass the comparisons above too)
    moved = [k for k in one if k.startswith("init:") and np.abs(one[k[5:]] - one[k]).max() > 1e-3]
    assert len(moved) > 4
