"""The memory plan against measured peaks, and what gradient checkpointing costs and saves.

    python3 bench/memory_plan.py --shape mistral7b --method qlora --budget-gb 24      # GPU acceptance
    python3 bench/memory_plan.py --shape smol135m --dtype float32 --shapes 1x128,2x256  # CPU, quick

For each micro-batch shape (rows x positions, every position trained: the plan's worst case) and each
variant, runs ``--steps`` optimizer steps of ft's trainer (LoRA r16 alpha 32 on q_proj/v_proj, AdamW,
compiled) on a model of the named shape with random weights, and reports MLX's peak memory
(``mx.get_peak_memory``, weights included), the median time of a step after the first (which compiles),
and what ``ft.models.memory.estimate_training_memory`` predicted for the same run before any weight
existed. Activations = measured peak - the planned weights, adapters and optimizer state (exact sizes).

A variant is ``CKPT:LIMIT``. CKPT: ``off``, or ``onK`` = gradient checkpointing with the last K blocks not
recomputed (ft's default K is ``ft.config.train.checkpoint_keep_last(layers)``). LIMIT: the memory limit MLX is held
to (``TrainOptions.memory_limit_bytes``): ``plan`` = what ``ft train`` sets (the plan's
``working_limit_bytes``), ``none`` = MLX's default (its queue of command buffers holds what it likes),
``min`` = 1 byte (every kernel waits for the one before: the least the step itself needs, slowly).
Prints a markdown table; with ``--json-out`` also the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from train_gpu import SHAPES, folder_info_of  # noqa: E402  (the benchmark's model shapes)


def measure(a: argparse.Namespace) -> list[dict]:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models import llama

    from ft.config.train import TrainConfig, checkpoint_keep_last
    from ft.engine.batching import ArrayExamples, BatchOptions, MicroBatchPlan, StepPlan
    from ft.engine.lora import AdapterSpec, apply_adapters
    from ft.engine.optim import OptimizerSpec, build_optimizer
    from ft.engine.trainer import TrainOptions, train
    from ft.models.memory import estimate_training_memory

    shape = SHAPES[a.shape]
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, **shape))
    dtype = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[a.dtype]
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    info = folder_info_of(model, shape)
    spec = AdapterSpec(method=a.method, rank=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"])
    apply_adapters(model, spec)
    mx.eval(model.parameters())
    on_cpu = mx.default_device() == mx.cpu
    rows_out = []
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    variants = [v.split(":") for v in a.variants.split(",")]
    for rows, length in shapes:
        rng = np.random.default_rng(0)
        data = ArrayExamples([rng.integers(3, shape["vocab_size"], size=length + 1) for _ in range(rows)])
        plan = [StepPlan(tuple(range(rows)), (MicroBatchPlan(tuple((i,) for i in range(rows)), length),))]
        for ckpt_name, limit_mode in variants:
            ckpt = ckpt_name != "off"
            keep = (
                (int(ckpt_name[2:]) if ckpt_name[2:] else checkpoint_keep_last(shape["num_hidden_layers"]))
                if ckpt
                else 0
            )
            cfg = TrainConfig.model_validate(
                {
                    "model": {"dtype": a.dtype},
                    "training": {
                        "method": a.method,
                        "batch_size": rows,
                        "grad_accumulation_steps": 1,
                        "gradient_checkpointing": ckpt,
                        "warmup_steps": 0,
                    },
                    "data": {"max_seq_length": length},
                    "lora": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
                }
            )
            est = estimate_training_memory(
                info,
                cfg,
                available_bytes=int(a.budget_gb * 1e9),
                on_cpu=on_cpu,
                budget_share=1.0,
                keep_last=keep if ckpt else None,
            )
            limit = {"plan": est.working_limit_bytes or None, "none": None, "min": 1}[limit_mode]
            opt = build_optimizer(OptimizerSpec(name="adamw", weight_decay=0.0), 1e-5)
            times: list[float] = []

            class Clock:
                def __init__(self, times: list[float]) -> None:
                    self.times = times

                def on_step(self, e):  # type: ignore[no-untyped-def]
                    self.times.append(e.step_seconds)

            steps = min(a.steps, 3) if limit_mode == "min" else a.steps
            opts = TrainOptions(
                BatchOptions(batch_size=rows, max_seq_length=length, packing=False, shuffle=False),
                total_steps=steps,
                eval_at_start=False,
                log_steps=steps,
                gradient_checkpointing=ckpt,
                checkpoint_keep_last=keep,
                memory_limit_bytes=limit,
            )
            mx.clear_cache()
            mx.reset_peak_memory()
            train(model, opt, data, None, opts, plan=lambda *_: plan, callbacks=[Clock(times)])  # noqa: B023
            peak = mx.get_peak_memory()
            step_s = float(np.median(times[1:])) if len(times) > 1 else times[0]
            r = {
                "shape": f"{rows}x{length}",
                "checkpointing": ckpt,
                "keep_last": keep,
                "limit": limit_mode,
                "limit_gb": (limit or 0) / 1e9,
                "peak_gb": peak / 1e9,
                "plan_gb": est.total_bytes / 1e9,
                "ratio": est.total_bytes / peak,
                "plan_activations_gb": est.activation_bytes / 1e9,
                "plan_fixed_gb": (est.total_bytes - est.activation_bytes - est.logits_bytes) / 1e9,
                "plan_logits_gb": est.logits_bytes / 1e9,
                "step_s": step_s,
                "step_times": [round(t, 4) for t in times],
                "first_step_s": times[0],
                "fits_budget": peak <= a.budget_gb * 1e9,
            }
            print(json.dumps(r), flush=True)
            rows_out.append(r)
            if a.json_out:  # written as it goes: a run cut short keeps what it measured
                Path(a.json_out).write_text(json.dumps({"args": vars(a), "results": rows_out}, indent=1))
            del opt
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="mistral7b")
    p.add_argument("--shapes", default="1x2048,2x2048", help="micro-batches, rows x positions")
    p.add_argument("--method", choices=["lora", "qlora"], default="qlora")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--variants",
        default="off:plan,on:plan",
        help="CKPT:LIMIT, comma-separated; CKPT off or onK (K last blocks not recomputed; on = ft's default), "
        "LIMIT plan, none or min (see the docstring)",
    )
    p.add_argument("--budget-gb", type=float, default=24.0, help="the device budget the plan compares with")
    p.add_argument("--device", choices=["default", "cpu"], default="default")
    p.add_argument("--json-out")
    a = p.parse_args()
    import mlx.core as mx

    if a.device == "cpu":
        mx.set_default_device(mx.cpu)
    info = {k: v for k, v in mx.device_info().items() if "memory" in k or "name" in k}
    print(f"# device_info: {info}", flush=True)

    print(f"# {a.shape} {a.method} {a.dtype} on {mx.default_device()}, budget {a.budget_gb} GB", flush=True)
    res = measure(a)
    print(
        "\n| micro-batch | checkpointing | MLX limit | measured peak GB | plan GB | plan / measured | step s | first step s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        ck = f"on (last {r['keep_last']} kept)" if r["checkpointing"] else "off"
        lim = r["limit"] + (f" ({r['limit_gb']:.2f} GB)" if r["limit"] == "plan" else "")
        print(
            f"| {r['shape']} | {ck} | {lim} | {r['peak_gb']:.2f} | {r['plan_gb']:.2f} "
            f"| {r['ratio']:.2f} | {r['step_s']:.3f} | {r['first_step_s']:.1f} |"
        )
    fixed = min(r["plan_fixed_gb"] for r in res)
    for s in dict.fromkeys(r["shape"] for r in res):
        for lim in dict.fromkeys(r["limit"] for r in res):
            off = next(
                (r for r in res if r["shape"] == s and r["limit"] == lim and not r["checkpointing"]), None
            )
            for on in (r for r in res if r["shape"] == s and r["limit"] == lim and r["checkpointing"]):
                if off is None:
                    continue
                act_off, act_on = off["peak_gb"] - fixed, on["peak_gb"] - fixed
                print(
                    f"{s}, limit {lim}, last {on['keep_last']} kept: activations+logits with checkpointing "
                    f"{act_on:.2f} GB = {act_on / act_off:.0%} of without ({act_off:.2f} GB; weights/adapters/"
                    f"optimizer {fixed:.2f} GB as planned); step time {on['step_s'] / off['step_s'] - 1:+.1%}"
                )
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"args": vars(a), "results": res}, indent=1))


if __name__ == "__main__":
    main()
