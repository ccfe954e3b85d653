"""Data-parallel scaling of `ft train`: the same run with 1 process and with N ranks, compared.

    python bench/train_dp.py --nproc 2                 # CPU: ring backend, embedded SmolLM2-135M
    python bench/train_dp.py --nproc 2 4 --model PATH  # a multi-GPU host: NCCL, one GPU per rank

Each run is a real `ft train` (`--nproc N` for N > 1) in a scratch workspace on the `ft init` sample, with
the same examples per optimizer step (batch_size x grad_accumulation_steps, accumulation = N x the
per-rank micro-batches), so the runs compute the same updates up to the order of additions. Reported per
process count: effective tokens/s (non-padding tokens per second of the training loop, from the run's
result), scaling efficiency (tokens/s / (N x the 1-process tokens/s)), the largest difference of the
final adapters from the 1-process run, and peak memory per rank as the run logged it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np


def ft(ws: Path, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "ft", "--workspace", str(ws), *args, "--json"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"ft {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def adapters(run_dir: Path) -> dict[str, np.ndarray]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return {
        k: np.array(v.astype(mx.float32))
        for k, v in mx.load(str(run_dir / "checkpoints" / latest / "adapters.safetensors")).items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[2])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model name, HF folder or .gguf")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches per step (divisible by each N)")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--workspace", type=Path, default=None)
    args = p.parse_args()
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="ft-dp-")) / "ws"
    if not (ws / "train.yml").is_file():
        subprocess.run([sys.executable, "-m", "ft", "init", str(ws)], check=True, capture_output=True)
        ft(ws, "models", "pull", args.model, "--name", "m")
        ft(ws, "dataset", "prepare", "data/sample.jsonl", "--name", "dp", "--model", "m")
    sets = [
        "model.name=m",
        f"training.max_steps={args.steps}",
        "training.warmup_steps=2",
        f"training.batch_size={args.batch_size}",
        f"training.grad_accumulation_steps={args.accumulation}",
        f"training.eval_steps={args.steps}",
        f"training.save_steps={args.steps}",
        f"data.max_seq_length={args.max_seq_length}",
        "lora.dropout=0",
    ]
    set_args = [a for s in sets for a in ("--set", s)]
    rows = []
    base = None
    for n in [1, *args.nproc]:
        extra = ["--nproc", str(n)] if n > 1 else []
        r = ft(ws, "train", "--dataset", "dp", "--name", f"dp-{n}", *set_args, *extra)
        run_dir = Path(r["path"])
        peak = max(
            (json.loads(line).get("memory") or {}).get("peak_gb") or 0.0
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"type": "train"' in line
        )
        w = adapters(run_dir)
        if base is None:
            base = (r["tokens_per_second"], w)
        diff = max(float(np.max(np.abs(w[k] - base[1][k]))) for k in w)
        rows.append((n, r["tokens_per_second"], r["tokens_per_second"] / (n * base[0]), diff, peak))
    print(
        f"device {mx.default_device()}, model {args.model}, {args.steps} steps of "
        f"{args.batch_size}x{args.accumulation} examples, max_seq_length {args.max_seq_length}"
    )
    print(f"{'ranks':>5} {'tokens/s':>10} {'efficiency':>10} {'max |adapter diff|':>18} {'peak GB/rank':>12}")
    for n, tps, eff, diff, peak in rows:
        print(f"{n:>5} {tps:>10,.0f} {eff:>10.1%} {diff:>18.2e} {peak:>12.2f}")


if __name__ == "__main__":
    main()
