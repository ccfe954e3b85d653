"""PEFT adapter export: adapter_model.safetensors + adapter_config.json, and PEFT's math checked on them."""

from __future__ import annotations

from typing import Any

from ft.models.export.checks import Check, Job, f32, fail


def export_peft(job: Job, adapters: list[Any], base_linears: dict[str, Any]) -> None:
    """``adapters`` (collected before fusing) as a PEFT adapter; ``base_linears``: the base weight of each
    adapted module, to check that PEFT's merge of the file gives the fused weights."""
    import numpy as np

    from ft.models.export.peft import peft_config, read_peft, write_peft

    ckpt, quant = job.ckpt, job.quant
    assert ckpt is not None  # ft.services.export refuses --format peft for a base model
    cfg = peft_config(
        adapters,
        base_model=ckpt.base_model,
        n_layers=int(job.config["num_hidden_layers"]),
        dropout=ckpt.spec().dropout,
    )
    write_peft(job.tmp, adapters, cfg, dtype="float16" if quant == "f16" else "float32")
    job.say("verifying the PEFT adapter")
    back, back_cfg = read_peft(job.tmp)
    by_module = {a.module: a for a in back}
    worst = 0.0
    for a in adapters:
        b = by_module.get(a.module)
        if b is None or b.lora_a.shape != a.lora_a.shape or b.lora_b.shape != a.lora_b.shape:
            raise fail("PEFT tensors", f"{a.module} missing or reshaped")
        # PEFT's math on the file must give the fused weight: W + (lora_alpha / r) * B @ A (DoRA: normalised).
        w = np.array(base_linears[a.module].astype(f32()))
        delta = (float(back_cfg["lora_alpha"]) / float(back_cfg["r"])) * (b.lora_b.T @ b.lora_a.T)
        merged = w + delta
        if b.magnitude is not None:
            merged = (b.magnitude / np.linalg.norm(merged, axis=1))[:, None] * merged
        target = np.array(job.tensors[f"{a.module}.weight"].astype(f32()))
        worst = max(worst, float(np.max(np.abs(merged - target))) / (float(np.max(np.abs(target))) or 1.0))
    if worst > (1e-4 if quant == "f32" else 2e-3):
        raise fail(
            "PEFT adapter math",
            f"W + (lora_alpha/r)·B·A differs from the fused weights by {worst:.3g} (relative)",
        )
    job.checks.append(
        Check(
            name="peft",
            ok=True,
            detail=f"{len(back)} modules, PEFT key names; W + (lora_alpha/r)·B·A "
            f"reproduces the fused weights (max relative error {worst:.2g})",
        )
    )


def base_weight(model: Any, module: str) -> Any:
    m = model
    for part in module.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m.linear.weight
