"""Where a GPU training step's time goes: one compiled LoRA gradient pass per micro-batch shape.

    PYTHONPATH=src python3 bench/gpu_step_probe.py                       # every env variant below
    PYTHONPATH=src python3 bench/gpu_step_probe.py --variants default    # one
    PYTHONPATH=src python3 bench/gpu_step_probe.py --steps-mode          # the trainer's loop on the real plan
    PYTHONPATH=src python3 bench/gpu_step_probe.py --compile-mode        # a new shape: compiled vs uncompiled
    PYTHONPATH=src python3 bench/gpu_step_probe.py --trainer-mode --steps 40   # bare loop vs train()

For each micro-batch layout (plain causal rows, packed rows with a segment mask, rows after a shared
prefix) and shape, on the Mistral-7B-shaped model of bench/train_gpu.py with the brief's LoRA (r16 on
q+v), it times ft's compiled gradient function: the host time until ``mx.async_eval`` returns (graph
encoding and kernel launches) and the wall time until the result is ready. Each env variant (MLX's CUDA
graph settings) runs in its own process. A diagnostic: no target; its findings go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "default": {},
    "ops100": {"MLX_MAX_OPS_PER_BUFFER": "100"},
    "ops200_cache2k": {"MLX_MAX_OPS_PER_BUFFER": "200", "MLX_CUDA_GRAPH_CACHE_SIZE": "2000"},
    "cache2k": {"MLX_CUDA_GRAPH_CACHE_SIZE": "2000"},
    "no_graphs": {"MLX_USE_CUDA_GRAPHS": "0"},
}
# (layout, rows, positions per row, examples per row, prefix)
SHAPES = [
    ("plain", 1, 2048, 1, 0),
    ("plain", 1, 1024, 1, 0),
    ("plain", 1, 512, 1, 0),
    ("plain", 2, 2048, 1, 0),
    ("packed", 1, 2048, 8, 0),
    ("packed", 1, 1024, 4, 0),
    ("prefix", 8, 256, 1, 24),
]


def batch(kind: str, rows: int, R: int, per_row: int, P: int, vocab: int):  # type: ignore[no-untyped-def]
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = rng.integers(100, vocab, size=(rows, R)).astype(np.int32)
    # half of every example is trained: like a chat reply
    pos = np.concatenate([r * R + np.arange(R // 2, R) for r in range(rows)]).astype(np.int32)
    labels = rng.integers(100, vocab, size=len(pos)).astype(np.int32)
    weights = np.ones(len(pos), dtype=np.float32)
    tail = (mx.array(pos), mx.array(labels), mx.array(weights))
    if kind == "packed":
        seg = np.repeat(np.arange(1, per_row + 1), R // per_row)[None].repeat(rows, 0).astype(np.int32)
        return kind, (mx.array(inputs), mx.array(seg), *tail)
    if kind == "prefix":
        return kind, (mx.array(inputs), mx.array(rng.integers(100, vocab, size=P).astype(np.int32)), *tail)
    return kind, (mx.array(inputs), *tail)


def lora_model(shape_name: str):  # type: ignore[no-untyped-def]
    """The benchmark's model with the brief's LoRA (r16, alpha 32, q+v)."""
    from ft.engine.lora import AdapterSpec, apply_adapters
    from train_gpu import SHAPES as MODEL_SHAPES
    from train_gpu import _mlx_model

    model = _mlx_model(MODEL_SHAPES[shape_name])
    apply_adapters(
        model, AdapterSpec(method="lora", rank=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    return model


def bench_plan(shape_name: str, steps: int, mb_cost: int | None = None, coarse: bool | None = None):  # type: ignore[no-untyped-def]
    """(data, batch options, index, first ``steps`` step plans) of bench/train_gpu.py's records."""
    from ft.engine.batching import ArrayExamples, BatchOptions, attention_cost, index_examples, plan_epoch
    from train_gpu import SHAPES as MODEL_SHAPES
    from train_gpu import make_records

    shape = MODEL_SHAPES[shape_name]
    records = make_records(1000, shape["vocab_size"], 0)
    data = ArrayExamples([r[0] for r in records], [[j >= r[1] for j in range(len(r[0]))] for r in records])
    bopts = BatchOptions(
        batch_size=2,
        grad_accumulation_steps=4,
        max_seq_length=2048,
        share_prefix=True,
        attention_cost=attention_cost(shape),
        micro_batch_cost=mb_cost,
        coarse_shapes=coarse,
    )
    index = index_examples(data, 2048)
    return data, bopts, index, plan_epoch(index, bopts, 0)[:steps]


def step_functions(shape_name: str):  # type: ignore[no-untyped-def]
    """(model, MLX AdamW, ft's compiled step functions) for the benchmark's LoRA model, optimizer ready."""
    import mlx.optimizers as optim

    from ft.engine.losses import check_model, make_loss
    from ft.engine.trainer import StepFunctions

    model = lora_model(shape_name)
    opt = optim.AdamW(learning_rate=1e-4)
    fns = StepFunctions(model, opt, make_loss(check_model(model)), 0.0)
    opt.init(model.trainable_parameters())
    return model, opt, fns


def step_grads(fns, batches, norm, wait: str = "sync"):  # type: ignore[no-untyped-def]
    """One optimizer step's summed gradients and loss over ``batches`` (the trainer's accumulation).

    ``wait``: "sync" evaluates after each micro-batch but the last (the trainer's loop); "none" builds
    the whole step before any evaluation; "deep" enqueues each micro-batch and then waits for the one
    before it (at most two in flight).
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    acc, loss_sum = None, mx.array(0.0)
    for k, b in enumerate(batches):
        total, _, grads = fns.grad(b, norm)
        prev = acc
        acc = grads if acc is None else tree_map(mx.add, acc, grads)
        loss_sum = loss_sum + total
        if wait == "sync" and k + 1 < len(batches):
            mx.eval(acc, loss_sum)
        elif wait == "deep":
            mx.async_eval(acc, loss_sum)
            if prev is not None:
                mx.eval(prev)
    return acc, loss_sum


def worker(a: argparse.Namespace) -> dict:
    import mlx.core as mx

    from train_gpu import SHAPES as MODEL_SHAPES

    shape = MODEL_SHAPES[a.shape]
    _, _, fns = step_functions(a.shape)
    norm = mx.array(1000.0)
    out = {}
    for kind, rows, R, per_row, P in SHAPES:
        b = batch(kind, rows, R, per_row, P, shape["vocab_size"])
        t0 = time.perf_counter()
        for _ in range(2):  # compile + first run of this shape
            mx.eval(fns.grad(b, norm))
        first = time.perf_counter() - t0
        host, wall = [], []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            res = fns.grad(b, norm)
            mx.async_eval(res)
            t1 = time.perf_counter()
            mx.eval(res)
            t2 = time.perf_counter()
            host.append(t1 - t0)
            wall.append(t2 - t0)
        key = f"{kind} {rows}x{R}" + (f" /{per_row}" if per_row > 1 else "") + (f" +{P}" if P else "")
        out[key] = {
            "host_s": round(min(host), 4),
            "wall_s": round(min(wall), 4),
            "first_two_s": round(first, 2),
            "tok_s": round(rows * R / min(wall)),
        }
        print(key, out[key], flush=True)
    out["peak_gb"] = round(mx.get_peak_memory() / 1e9, 1)
    return out


def steps_worker(a: argparse.Namespace) -> dict:
    """The trainer's step loop on the benchmark's real plan, timed by phase, in three ways (same shapes)."""
    import mlx.core as mx
    import numpy as np

    from ft.engine.batching import collate
    from ft.engine.trainer import _to_mx

    model, opt, fns = step_functions(a.shape)
    data, bopts, index, plans = bench_plan(a.shape, a.steps, a.mb_cost)
    real = sum(int(index.positions[list(sp.examples)].sum()) for sp in plans)

    def run(mode: str) -> dict:
        per_step = []
        t_start = time.perf_counter()
        pending = None
        for sp in plans:
            t0 = time.perf_counter()
            norm = mx.array(float(index.trained[list(sp.examples)].sum()))
            mbs = [_to_mx(collate(data, mbp, index, 0, bopts.target_step)) for mbp in sp.micro_batches]
            t1 = time.perf_counter()
            acc, loss_sum = step_grads(fns, mbs, norm, "sync" if mode == "sync" else "none")
            t2 = time.perf_counter()
            gnorm, ok = fns.apply(acc, loss_sum)
            outs = [model.trainable_parameters(), opt.state, gnorm, ok, loss_sum]
            if mode == "pipelined":
                mx.async_eval(*outs)
                if pending is not None:
                    float(pending[0].item()), bool(pending[1].item())
                pending = (loss_sum, ok)
            else:
                mx.eval(*outs)
                float(loss_sum.item()), bool(ok.item())
            t3 = time.perf_counter()
            pos = sum(int(np.prod(mbp.shape)) + mbp.prefix for mbp in sp.micro_batches)
            per_step.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0, pos, len(sp.micro_batches)))
        if pending is not None:
            mx.eval(pending[0])
        wall = time.perf_counter() - t_start
        arr = np.array(per_step)
        fit = np.polyfit(arr[:, 4], arr[:, 3], 1)
        return {
            "wall_s": round(wall, 2),
            "tok_s": round(real / wall),
            "collate_s": round(arr[:, 0].sum(), 2),
            "grads_host_s": round(arr[:, 1].sum(), 2),
            "apply_eval_s": round(arr[:, 2].sum(), 2),
            "padded_positions": int(arr[:, 4].sum()),
            "micro_batches": int(arr[:, 5].sum()),
            "fit_s_per_step": round(float(fit[1]), 4),
            "fit_us_per_position": round(float(fit[0]) * 1e6, 2),
        }

    out = {"steps": len(plans), "real_positions": real}
    t0 = time.perf_counter()
    run("sync")  # compiles every shape of the plan
    out["first_pass_s"] = round(time.perf_counter() - t0, 1)
    for mode in ("sync", "nosync", "pipelined", "sync"):
        out[mode + ("_again" if mode in out else "")] = run(mode)
        print(mode, out[mode], flush=True)
    out["peak_gb"] = round(mx.get_peak_memory() / 1e9, 1)
    return out


def compile_worker(a: argparse.Namespace) -> dict:
    """What a new micro-batch shape costs: compiled vs uncompiled gradient, first call vs steady.

    For each new shape: host time of the call (trace + compile on a first compiled call), wall time of
    its evaluation, then the steady (best of ``reps``) host and wall time. Then ``chain`` micro-batches
    of one shape run back to back without a sync (the next graph is built while the GPU runs).
    """
    import mlx.core as mx
    import mlx.optimizers as optim

    from ft.engine.losses import check_model, make_loss
    from ft.engine.trainer import StepFunctions
    from train_gpu import SHAPES as MODEL_SHAPES

    shape = MODEL_SHAPES[a.shape]
    model = lora_model(a.shape)
    opt = optim.AdamW(learning_rate=1e-4)
    loss = make_loss(check_model(model))
    modes = {
        "compiled": StepFunctions(model, opt, loss, 0.0),
        "eager": StepFunctions(model, opt, loss, 0.0, compile=False),
    }
    norm = mx.array(1000.0)
    out: dict = {}
    sizes = [(8, 256), (4, 512), (2, 1024), (8, 320), (4, 640), (2, 1280), (6, 384), (3, 768), (1, 2048)]
    for name, fns in modes.items():
        for rows, R in sizes:
            b = batch("plain", rows, R, 1, 0, shape["vocab_size"])
            t0 = time.perf_counter()
            res = fns.grad(b, norm)
            t1 = time.perf_counter()
            mx.eval(res)
            t2 = time.perf_counter()
            host, wall = [], []
            for _ in range(a.reps):
                t3 = time.perf_counter()
                res = fns.grad(b, norm)
                t4 = time.perf_counter()
                mx.eval(res)
                host.append(t4 - t3)
                wall.append(time.perf_counter() - t3)
            key = f"{name} {rows}x{R}"
            out[key] = {
                "first_host_s": round(t1 - t0, 3),
                "first_wall_s": round(t2 - t0, 3),
                "host_s": round(min(host), 4),
                "wall_s": round(min(wall), 4),
            }
            print(key, out[key], flush=True)
        for rows, R in [(8, 256), (2, 1024)]:
            b = batch("plain", rows, R, 1, 0, shape["vocab_size"])
            t0 = time.perf_counter()
            for _ in range(a.chain):
                total, _, grads = fns.grad(b, norm)
                mx.async_eval(total, grads)
            mx.eval(total, grads)
            key = f"{name} chain {a.chain} x {rows}x{R}"
            out[key] = {"per_micro_batch_s": round((time.perf_counter() - t0) / a.chain, 4)}
            print(key, out[key], flush=True)
    out["peak_gb"] = round(mx.get_peak_memory() / 1e9, 1)
    return out


def trainer_worker(a: argparse.Namespace) -> dict:
    """The same steps through a bare loop and through ``train()``, with MLX's AdamW and with ft's.

    The first ``steps`` steps of the benchmark's plan run twice in a row; only the second pass counts
    (every shape compiled). Tells whether the trainer adds time per step, and where.
    """
    import mlx.core as mx
    import mlx.optimizers as optim

    from ft.engine.batching import collate
    from ft.engine.losses import check_model, make_loss
    from ft.engine.optim import OptimizerSpec, build_optimizer
    from ft.engine.trainer import StepFunctions, TrainOptions, _to_mx, train

    model = lora_model(a.shape)
    data, bopts, index, plans = bench_plan(a.shape, a.steps)
    loss = make_loss(check_model(model))
    opts = {
        "mlx_adamw": lambda: optim.AdamW(learning_rate=1e-4),
        "ft_adamw": lambda: build_optimizer(OptimizerSpec(name="adamw", weight_decay=0.0), 1e-4),
    }
    out: dict = {}
    for oname, make_opt in opts.items():
        opt = make_opt()
        fns = StepFunctions(model, opt, loss, 0.0)
        opt.init(model.trainable_parameters())
        per_step = []
        for sp in plans + plans:
            t0 = time.perf_counter()
            norm = mx.array(float(index.trained[list(sp.examples)].sum()))
            mbs = [_to_mx(collate(data, mbp, index, 0, bopts.target_step)) for mbp in sp.micro_batches]
            acc, loss_sum = step_grads(fns, mbs, norm)
            gnorm, ok = fns.apply(acc, loss_sum)
            mx.eval(model.trainable_parameters(), opt.state, gnorm, ok, loss_sum)
            float(loss_sum.item()), bool(ok.item())
            per_step.append(time.perf_counter() - t0)
        out[f"loop {oname}"] = round(sum(per_step[len(plans) :]), 3)
        print(
            f"loop {oname}",
            out[f"loop {oname}"],
            [round(x, 3) for x in per_step[len(plans) :][:12]],
            flush=True,
        )

        secs: list[float] = []

        class Clock:
            def __init__(self, out: list[float]) -> None:
                self.out = out

            def on_step(self, e):  # type: ignore[no-untyped-def]
                self.out.append(e.step_seconds)

        topts = TrainOptions(
            bopts, total_steps=2 * len(plans), eval_at_start=False, log_steps=10**6, max_grad_norm=0.0
        )
        train(
            model, make_opt(), data, None, topts, plan=lambda i, b, e: plans + plans, callbacks=[Clock(secs)]
        )
        out[f"train {oname}"] = round(sum(secs[len(plans) :]), 3)
        print(
            f"train {oname}",
            out[f"train {oname}"],
            [round(x, 3) for x in secs[len(plans) :][:12]],
            flush=True,
        )
    return out


def epoch_worker(a: argparse.Namespace) -> dict:
    """Two passes over the benchmark's one-epoch plan, per step: time, new shapes, allocator state.

    ``--pipeline sync`` waits for every micro-batch (the trainer's loop); ``deep`` enqueues micro-batch
    k+1 before waiting for k, and reads a step's loss only after the next step is enqueued, so the host's
    work for a new shape (tracing, cuDNN plans, CUDA graphs) overlaps the GPU's work.
    """
    import mlx.core as mx
    import numpy as np

    from ft.engine.batching import collate
    from ft.engine.trainer import _to_mx

    model, opt, fns = step_functions(a.shape)
    data, bopts, index, plans = bench_plan(a.shape, a.steps, a.mb_cost, a.coarse)
    real = sum(int(index.positions[list(sp.examples)].sum()) for sp in plans)
    seen: set = set()

    def run() -> dict:
        rows = []
        pending: list = []
        t_start = time.perf_counter()
        prev_end = t_start
        for sp in plans:
            norm = mx.array(float(index.trained[list(sp.examples)].sum()))
            keys = {(m.packed, *m.shape, m.prefix, m.targets) for m in sp.micro_batches}
            new = len(keys - seen)
            seen.update(keys)
            mbs = [_to_mx(collate(data, mbp, index, 0, bopts.target_step)) for mbp in sp.micro_batches]
            acc, loss_sum = step_grads(fns, mbs, norm, a.pipeline)
            gnorm, ok = fns.apply(acc, loss_sum)
            outs = [model.trainable_parameters(), opt.state, gnorm, ok, loss_sum]
            if a.pipeline == "sync":
                mx.eval(*outs)
                float(loss_sum.item())
            else:
                mx.async_eval(*outs)
                if pending:
                    float(pending.pop()[0].item())
                pending.append((loss_sum, ok))
            now = time.perf_counter()
            pos = sum(int(np.prod(m.shape)) + m.prefix for m in sp.micro_batches)
            rows.append(
                (
                    round(now - prev_end, 4),
                    new,
                    pos,
                    len(sp.micro_batches),
                    round(mx.get_active_memory() / 1e9, 1),
                    round(mx.get_cache_memory() / 1e9, 1),
                )
            )
            prev_end = now
        for lo, _ in pending:
            float(lo.item())
        wall = time.perf_counter() - t_start
        arr = np.array([r[:4] for r in rows], dtype=float)
        old = arr[:, 1] == 0
        fit = np.polyfit(arr[old, 2], arr[old, 0], 1) if old.sum() > 2 else [0.0, 0.0]
        return {
            "wall_s": round(wall, 2),
            "tok_s": round(real / wall),
            "new_shape_steps": int((~old).sum()),
            "new_shape_steps_s": round(float(arr[~old, 0].sum()), 2),
            "old_shape_steps_s": round(float(arr[old, 0].sum()), 2),
            "old_fit_s_per_step": round(float(fit[1]), 4),
            "old_fit_us_per_position": round(float(fit[0]) * 1e6, 2),
            "steps": rows,
        }

    out: dict = {
        "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
        "pipeline": a.pipeline,
        "real_positions": real,
    }
    for name in ("first", "second"):
        out[name] = run()
        print(name, {k: v for k, v in out[name].items() if k != "steps"}, flush=True)
    out["peak_gb"] = round(mx.get_peak_memory() / 1e9, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--shape", default="mistral7b")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--json-out")
    p.add_argument("--steps-mode", action="store_true", help="time the trainer's step loop instead")
    p.add_argument("--steps", type=int, default=125)
    p.add_argument(
        "--compile-mode", action="store_true", help="what a new shape costs, compiled vs uncompiled"
    )
    p.add_argument("--chain", type=int, default=8)
    p.add_argument("--trainer-mode", action="store_true", help="bare loop vs train() on the same steps")
    p.add_argument("--mb-cost", type=int, default=None, help="BatchOptions.micro_batch_cost for --steps-mode")
    p.add_argument("--epoch-mode", action="store_true", help="two passes over the epoch's plan, per step")
    p.add_argument("--pipeline", choices=["sync", "deep"], default="sync")
    p.add_argument("--ft-shapes", choices=["auto", "coarse", "fine"], default="auto")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    a.coarse = {"auto": None, "coarse": True, "fine": False}[a.ft_shapes]
    if a.epoch_mode:
        res = epoch_worker(a)
        print(json.dumps({k: v for k, v in res.items() if k not in ("first", "second")}))
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(res))
        return
    if a.steps_mode or a.compile_mode or a.trainer_mode:
        res = steps_worker(a) if a.steps_mode else compile_worker(a) if a.compile_mode else trainer_worker(a)
        print(json.dumps(res, indent=1))
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(res, indent=1))
        return
    if a.worker:
        Path(a.out).write_text(json.dumps(worker(a)))
        return
    results = {}
    for name in a.variants.split(","):
        env = {**os.environ, **VARIANTS[name]}
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--out",
                f.name,
                "--shape",
                a.shape,
                "--reps",
                str(a.reps),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            results[name] = json.loads(Path(f.name).read_text())
        print(f"== {name} {VARIANTS[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for k, v in results[name].items():
            print(f"  {k}: {v}", flush=True)
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
