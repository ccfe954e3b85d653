"""MLX CPU math on Linux: matmul GFLOP/s with and without the optimized-BLAS preload, and LoRA step speed
on the embedded SmolLM2 as stored (4-bit) vs dequantized to float32 (both with the preload).

    python bench/models_cpu.py            # full run (a few minutes on 2 cores)
    python bench/models_cpu.py --quick    # fewer/shorter steps

Every measurement runs in a fresh subprocess, because the BLAS library is bound when mlx loads:
one with LD_PRELOAD pointing at the library ft.engine.runtime finds, one without. Ratios are printed
against the anchor measured in the same run (the reference BLAS; the 4-bit model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- workers
def _matmul_worker(sizes: list[int]) -> dict:
    from ft.engine import runtime

    out = {"blas": runtime.blas_kind(), "libraries": runtime.loaded_blas()}
    for n in sizes:
        out[str(n)] = runtime.matmul_gflops(n=n, seconds=1.0, device="cpu")
    return out


def _lora_worker(model_dir: str, precision: str, batch: int, seq: int, steps: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from ft.engine import runtime
    from ft.models.loading import load_model_dir

    loaded = load_model_dir(model_dir, dequantize=precision == "float32")
    model = loaded.model
    model.freeze()
    # LoRA on the attention projections, rank 8, as a typical small run would use.
    linear_to_lora_layers(
        model,
        len(model.layers),
        {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
    )
    opt = optim.AdamW(1e-4)
    value_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    mx.random.seed(0)
    x = mx.random.randint(0, 49152, (batch, seq + 1))

    def step() -> float:
        loss, grads = value_and_grad(model, x[:, :-1], x[:, 1:])
        opt.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), opt.state)
        return loss.item()

    step()  # warm-up: allocation, first-call overheads
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    return {
        "precision": loaded.dtype if precision == "float32" else "4-bit as stored",
        "blas": runtime.blas_kind(),
        "tokens_per_s": batch * seq * steps / elapsed,
        "s_per_step": elapsed / steps,
    }


# ------------------------------------------------------------------------------------- driver
def _run_worker(args: list[str], preload: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["FT_NO_BLAS_PRELOAD"] = "1"  # the bench decides; nothing re-executes behind its back
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if preload:
        env["LD_PRELOAD"] = preload
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=["matmul", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    if a.worker == "matmul":
        print(json.dumps(_matmul_worker([512, 1024] if a.quick else [512, 1024, 2048])))
        return
    if a.worker == "lora":
        print(json.dumps(_lora_worker(a.model_dir, a.precision, a.batch, a.seq, a.steps)))
        return

    sys.path.insert(0, str(ROOT / "src"))
    from ft.engine import runtime
    from ft.models.embedded import embedded_gguf_path
    from ft.models.gguf_import import import_gguf

    if platform.system() != "Linux":
        raise SystemExit("this benchmark is about MLX's Linux CPU backend")
    blas = runtime.find_fast_blas()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"optimized BLAS: {blas or 'none found'}"
    )
    print("\n== float32 matmul on CPU (GFLOP/s) ==")
    ref = _run_worker(["--worker", "matmul"] + (["--quick"] if a.quick else []), None)
    fast = _run_worker(["--worker", "matmul"] + (["--quick"] if a.quick else []), str(blas)) if blas else None
    print(
        f"{'n':>6} {'no preload (MLX wheel)':>24} {'preloaded (' + (fast or {}).get('blas', '-') + ')':>24} {'ratio':>7}"
    )
    for n in [k for k in ref if k.isdigit()]:
        f = fast[n] if fast else float("nan")
        print(f"{n:>6} {ref[n]:>24.1f} {f:>24.1f} {f / ref[n]:>6.1f}x")

    print("\n== LoRA training step on SmolLM2-135M (rank 8 on q/v, AdamW), optimized BLAS ==")
    model_dir = ROOT / ".bench" / "smollm2-135m-instruct"
    if not (model_dir / "config.json").is_file():
        import_gguf(embedded_gguf_path(), model_dir)
    batch, seq, steps = (1, 64, 1) if a.quick else (a.batch, a.seq, a.steps)
    common = [
        "--worker",
        "lora",
        "--model-dir",
        str(model_dir),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
    ]
    q4 = _run_worker([*common, "--precision", "q4"], str(blas) if blas else None)
    f32 = _run_worker([*common, "--precision", "float32"], str(blas) if blas else None)
    print(f"batch {batch} x {seq} tokens, {steps} timed steps after one warm-up")
    print(f"{'weights':<28} {'tokens/s':>10} {'s/step':>8} {'ratio':>7}")
    for r in (q4, f32):
        print(
            f"{r['precision']:<28} {r['tokens_per_s']:>10.1f} {r['s_per_step']:>8.2f} "
            f"{r['tokens_per_s'] / q4['tokens_per_s']:>6.1f}x"
        )


if __name__ == "__main__":
    main()
