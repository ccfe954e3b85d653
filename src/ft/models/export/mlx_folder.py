"""mlx-lm folder export: write it, load it with mlx_lm.load, and compare tensors and logits."""

from __future__ import annotations

from ft.models.export.checks import RUNTIME_TOLERANCE, Check, Job, fail, flat


def export_mlx(job: Job) -> None:
    from mlx_lm.utils import load as mlx_load

    from ft.models.export import verify
    from ft.models.export.folders import write_mlx_folder

    write_mlx_folder(job.tmp, job.model, job.config, job.base_dir, job.quant)
    job.say("verifying the mlx-lm folder")
    back, _tok = mlx_load(str(job.tmp))
    want = {k: tuple(v.shape) for k, v in flat(job.model.parameters()).items()}
    got = {k: tuple(v.shape) for k, v in flat(back.parameters()).items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:8]
        raise fail("tensor names/shapes of the mlx folder", str(diff))
    job.checks.append(
        Check(name="tensors", ok=True, detail=f"mlx_lm.load reads {len(got)} tensors, names and shapes match")
    )
    job.check_logits("mlx-lm folder", verify.logits(back, job.ids), limits=RUNTIME_TOLERANCE)
