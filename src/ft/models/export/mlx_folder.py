"""mlx-lm folder export: write it, load it with mlx_lm.load, and compare tensors and logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft.models.export.checks import (
    RUNTIME_TOLERANCE,
    Check,
    Progress,
    Tuned,
    check_logits,
    fail,
    flat,
)


def export_mlx(
    tmp: Path,
    mdl: Any,
    config: dict[str, Any],
    base_dir: Path,
    quant: str,
    ids: list[list[int]],
    reference: list[Any],
    base: list[Any],
    checks: list[Check],
    ckpt: Tuned | None,
    say: Progress,
) -> None:
    from mlx_lm.utils import load as mlx_load

    from ft.models.export import verify
    from ft.models.export.folders import write_mlx_folder

    write_mlx_folder(tmp, mdl, config, base_dir, quant)
    say("verifying the mlx-lm folder")
    back, _tok = mlx_load(str(tmp))
    want = {k: tuple(v.shape) for k, v in flat(mdl.parameters()).items()}
    got = {k: tuple(v.shape) for k, v in flat(back.parameters()).items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:8]
        raise fail("tensor names/shapes of the mlx folder", str(diff))
    checks.append(
        Check(name="tensors", ok=True, detail=f"mlx_lm.load reads {len(got)} tensors, names and shapes match")
    )
    check_logits(
        "mlx-lm folder",
        verify.logits(back, ids),
        reference,
        base,
        quant,
        checks,
        tuned=ckpt is not None,
        limits=RUNTIME_TOLERANCE,
    )
