"""Training throughput on CPU: ft's engine against mlx-lm's LoRA trainer, same model, data and settings.

    python bench/train_cpu.py                    # engine vs engine + the "as a user runs it" comparison
    python bench/train_cpu.py --skip-user        # engine vs engine only (minutes instead of ~20)

Both engines train the embedded SmolLM2-135M-Instruct (imported from its GGUF into an mlx-lm folder;
a float32 copy is written for the engine-vs-engine runs) on the same generated WikiSQL-like
text-to-SQL records, tokenized once by mlx-lm's own CompletionsDataset (chat template, loss on the
completion only: mlx-lm's --mask-prompt) and handed to both as the same token ids. Same LoRA (rank,
scale alpha/rank, q_proj+v_proj, all layers), batch size, sequence limit, optimizer (AdamW, constant
lr) and number of steps; no validation inside the timed loop.

Each engine runs in its own subprocess (so peak memory is its own), alternating, ``--rounds`` times;
the best round of each counts (the machine's speed drifts: other jobs share it). Reported:

* effective tokens/s: non-padding tokens of the examples trained on, per wall second of the training
  loop (compilation included, model loading excluded);
* peak memory: MLX's peak allocation and the process's peak RSS.

Comparisons:

1. engine vs engine: float32 weights, the same optimized BLAS preloaded for both: the one ``ft``
   picks (``ft.engine.runtime.find_fast_blas``: MKL on Intel CPUs, else OpenBLAS; target: ft >= 1.5x mlx-lm);
2. as a user runs it: ``mlx_lm.lora`` on the 4-bit model as stored with the stock BLAS of MLX's CPU
   wheel, against ``ft train`` (which dequantizes on CPU and preloads that BLAS itself; target >= 20x).
   mlx-lm's 4-bit CPU steps take minutes each, so this one runs ``--user-steps`` steps (tokens/s is
   per second either way).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ft.engine.runtime import blas_kind, find_fast_blas  # noqa: E402  (no MLX import: the driver stays BLAS-free)

FAST_BLAS = find_fast_blas()
FAST_NAME = {"mkl": "MKL", "openblas": "OpenBLAS"}.get(blas_kind(str(FAST_BLAS or "")), str(FAST_BLAS))

TABLES = [
    ("employees", ["name", "department", "salary", "city", "start_year"]),
    ("matches", ["home_team", "away_team", "score", "venue", "date"]),
    ("elections", ["district", "incumbent", "party", "first_elected", "result"]),
    ("albums", ["title", "artist", "year", "label", "sales"]),
    ("flights", ["flight_no", "origin", "destination", "airline", "duration"]),
    ("stations", ["station", "frequency", "owner", "format", "city_of_license"]),
]
VALUES = ["Boston", "Alice Chen", "Democratic", "1998", "Lufthansa", "Red Hill", "Sony", "3-1", "KQED", "42"]


def wikisql_records(n: int, seed: int) -> list[dict[str, str]]:
    """WikiSQL-like records: a table header and a question -> one SQL query."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        table, cols = r.choice(TABLES)
        sel, cond = r.sample(cols, 2)
        val = r.choice(VALUES)
        agg = r.choice(["", "", "COUNT", "MAX", "MIN"])
        q = {
            "": f"What is the {sel.replace('_', ' ')} when the {cond.replace('_', ' ')} is {val}?",
            "COUNT": f"How many {sel.replace('_', ' ')} entries have {cond.replace('_', ' ')} {val}?",
            "MAX": f"What is the highest {sel.replace('_', ' ')} with {cond.replace('_', ' ')} {val}?",
            "MIN": f"What is the lowest {sel.replace('_', ' ')} with {cond.replace('_', ' ')} {val}?",
        }[agg]
        extra = r.randint(0, 3)
        rows = "\n".join(" | ".join(r.choice(VALUES) for _ in cols) for _ in range(extra))
        prompt = f"table: {table}\ncolumns: {', '.join(cols)}\n{rows + chr(10) if rows else ''}Q: {q}"
        col = f"{agg}({sel})" if agg else sel
        out.append({"prompt": prompt, "completion": f"SELECT {col} FROM {table} WHERE {cond} = '{val}'"})
    return out


# ---------------------------------------------------------------- workers (run in subprocesses)
def _cpu_seconds() -> float:
    """CPU time of this process, all threads: steadier than wall time when other jobs share the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tokenized(model_dir: Path, data_dir: Path) -> tuple[object, list[tuple[list[int], int]]]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.tuner.datasets import load_local_dataset

    tok = load_tokenizer(model_dir)
    train, _, _ = load_local_dataset(data_dir, tok, SimpleNamespace(mask_prompt=True))
    return tok, [train.process(train[i]) for i in range(len(train))]


def worker_mlx_lm(a: argparse.Namespace) -> dict[str, float]:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, tok = load(a.model)
    train_set, _, _ = load_local_dataset(Path(a.data), tok, SimpleNamespace(mask_prompt=True))
    model.freeze()
    linear_to_lora_layers(
        model,
        a.layers,
        {
            "rank": a.rank,
            "scale": a.alpha / a.rank,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
    )
    mx.random.seed(a.seed)
    counted = {"tokens": 0, "examples": 0}

    def counting_batches(**kw):  # type: ignore[no-untyped-def]
        for batch, lengths in iterate_batches(**kw):
            ln = lengths.tolist()
            counted["tokens"] += sum(min(int(l1), a.max_seq_length) for _, l1 in ln)
            counted["examples"] += len(ln)
            yield batch, lengths

    opt = optim.AdamW(learning_rate=a.lr, weight_decay=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(
            batch_size=a.batch_size,
            iters=a.steps,
            steps_per_report=a.steps,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=a.max_seq_length,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
        )
        mx.reset_peak_memory()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        train(model, opt, CacheDataset(train_set), None, args, iterate_batches=counting_batches)
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "tokens": counted["tokens"],
        "examples": counted["examples"],
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
    }


def worker_ft(a: argparse.Namespace) -> dict[str, float]:
    import mlx.core as mx

    from ft.engine.batching import ArrayExamples, BatchOptions
    from ft.engine.lora import AdapterSpec, apply_adapters
    from ft.engine.optim import OptimizerSpec, build_optimizer
    from ft.engine.trainer import TrainOptions, train
    from ft.models.loading import load

    model, _ = load(a.model)  # on CPU a quantized folder is dequantized to float32 (ft's policy)
    _, pairs = _tokenized(Path(a.model), Path(a.data))
    tokens = [p[0] for p in pairs]
    masks = [[j >= p[1] for j in range(len(p[0]))] for p in pairs]
    data = ArrayExamples(tokens, masks)
    mx.random.seed(a.seed)
    apply_adapters(
        model,
        AdapterSpec(
            method="lora",
            rank=a.rank,
            alpha=a.alpha,
            dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            layers=a.layers,
        ),
    )
    opt = build_optimizer(OptimizerSpec(name="adamw", weight_decay=0.0), a.lr)
    seen = {"tokens": 0, "examples": 0}

    class Count:
        def on_step(self, e):  # type: ignore[no-untyped-def]
            seen["tokens"] += e.tokens + e.examples  # positions + the last token of each example
            seen["examples"] += e.examples

    packing = {"auto": None, "true": True, "false": False}[a.ft_packing]
    opts = TrainOptions(
        BatchOptions(
            batch_size=a.batch_size,
            grad_accumulation_steps=1,
            max_seq_length=a.max_seq_length,
            seed=a.seed,
            share_prefix=True,
            attention_cost=3.3e-4,
            packing=packing,
        ),
        total_steps=a.steps,
        eval_at_start=False,
        log_steps=a.steps,
        max_grad_norm=0.0,
    )
    mx.reset_peak_memory()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    train(model, opt, data, None, opts, callbacks=[Count()])
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "tokens": seen["tokens"],
        "examples": seen["examples"],
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
    }


# ---------------------------------------------------------------- driver
def prepare(work: Path, n: int, seed: int) -> tuple[Path, Path, Path]:
    from ft.models.embedded import embedded_gguf_path
    from ft.models.gguf_import import import_gguf

    work.mkdir(parents=True, exist_ok=True)
    q4 = work / "smollm2-q4"
    if not (q4 / "config.json").is_file():
        import_gguf(embedded_gguf_path(), q4, overwrite=q4.exists())
    f32 = work / "smollm2-f32"
    if not (f32 / "config.json").is_file():
        import shutil

        from mlx_lm.utils import save_model

        from ft.models.loading import load

        model, _ = load(q4, dequantize=True, dtype="float32")
        f32.mkdir(parents=True, exist_ok=True)
        save_model(f32, model)
        cfg = json.loads((q4 / "config.json").read_text())
        cfg.pop("quantization", None)
        cfg.pop("quantization_config", None)
        (f32 / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(q4 / name, f32 / name)
    data = work / "wikisql"
    data.mkdir(exist_ok=True)
    recs = wikisql_records(n, seed)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wikisql_records(16, seed + 1)))
    return q4, f32, data


def run_worker(
    engine: str, model: Path, data: Path, a: argparse.Namespace, steps: int, fast_blas: bool
) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["FT_NO_BLAS_PRELOAD"] = "1"  # the driver decides the BLAS of each worker
    if fast_blas:
        if FAST_BLAS is None:
            raise SystemExit("no optimized BLAS on this machine (see ft doctor)")
        env["LD_PRELOAD"] = str(FAST_BLAS)
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            engine,
            "--model",
            str(model),
            "--data",
            str(data),
            "--steps",
            str(steps),
            "--batch-size",
            str(a.batch_size),
            "--max-seq-length",
            str(a.max_seq_length),
            "--rank",
            str(a.rank),
            "--alpha",
            str(a.alpha),
            "--layers",
            str(a.layers),
            "--lr",
            str(a.lr),
            "--seed",
            str(a.seed),
            "--ft-packing",
            a.ft_packing,
            "--out",
            out.name,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{engine} worker failed ({proc.returncode})")
        res = json.loads(Path(out.name).read_text())
    res["tok_s"] = res["tokens"] / res["seconds"]
    res["tok_cpu_s"] = res["tokens"] / res["cpu_seconds"]
    res["steps_run"] = steps
    res["engine"], res["blas"], res["model"] = engine, FAST_NAME if fast_blas else "stock", model.name
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["mlx_lm", "ft"])
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--user-steps", type=int, default=3, help="steps of the slow 4-bit/stock-BLAS mlx-lm run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-user", action="store_true")
    p.add_argument(
        "--ft-packing", choices=["auto", "true", "false"], default="auto", help="ft's packing (a diagnostic)"
    )
    p.add_argument("--work", default=str(ROOT / ".bench" / "train_cpu"))
    a = p.parse_args()

    if a.worker:
        res = (worker_mlx_lm if a.worker == "mlx_lm" else worker_ft)(a)
        res["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        Path(a.out).write_text(json.dumps(res))
        return

    q4, f32, data = prepare(Path(a.work), a.examples, a.seed)
    print(
        f"# data: {a.examples} WikiSQL-like records; batch {a.batch_size}, max_seq_length {a.max_seq_length}, "
        f"LoRA r{a.rank} alpha {a.alpha:g} q_proj+v_proj on {a.layers} layers, AdamW lr {a.lr:g}, {a.steps} steps; "
        f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    best: dict[str, dict] = {}
    paired: list[tuple[float, float]] = []
    for rnd in range(a.rounds):
        pair = {}
        # Alternate which engine goes first, so a slow drift of the machine favours neither.
        for engine in ("mlx_lm", "ft") if rnd % 2 == 0 else ("ft", "mlx_lm"):
            r = run_worker(engine, f32, data, a, a.steps, fast_blas=True)
            pair[engine] = r
            print(
                f"  round {rnd} {engine:7s} f32+{FAST_NAME}: {r['tok_s']:7.1f} tok/s wall, {r['tok_cpu_s']:7.1f} tok/CPU-s; "
                f"{r['tokens']} tokens in {r['seconds']:.1f}s ({r['cpu_seconds']:.1f} CPU-s); "
                f"MLX peak {r['mlx_peak_gb']:.2f} GB, max RSS {r['max_rss_gb']:.2f} GB; "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if engine not in best or r["tok_s"] > best[engine]["tok_s"]:
                best[engine] = r
        paired.append(
            (
                pair["ft"]["tok_s"] / pair["mlx_lm"]["tok_s"],
                pair["ft"]["tok_cpu_s"] / pair["mlx_lm"]["tok_cpu_s"],
            )
        )
    print(
        "\n| engine | weights | BLAS | steps | best effective tok/s (wall) | tok per CPU-second | MLX peak GB | max RSS GB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k in ("mlx_lm", "ft"):
        r = best[k]
        print(
            f"| {k} | float32 | {FAST_NAME} | {a.steps} | {r['tok_s']:.1f} | {r['tok_cpu_s']:.1f} | "
            f"{r['mlx_peak_gb']:.2f} | {r['max_rss_gb']:.2f} |"
        )
    wall = best["ft"]["tok_s"] / best["mlx_lm"]["tok_s"]
    med_wall = statistics.median(w for w, _ in paired)
    med_cpu = statistics.median(c for _, c in paired)
    print(
        f"\nengine vs engine (float32, {FAST_NAME}), ft / mlx_lm: best rounds {wall:.2f}x; paired rounds "
        f"{', '.join(f'{w:.2f}x' for w, _ in paired)} wall (median {med_wall:.2f}x), "
        f"{', '.join(f'{c:.2f}x' for _, c in paired)} per CPU-second (median {med_cpu:.2f}x); target >= 1.5x"
    )

    if not a.skip_user:
        u = run_worker("mlx_lm", q4, data, a, a.user_steps, fast_blas=False)
        f = run_worker("ft", q4, data, a, a.steps, fast_blas=True)
        print(
            "\n| run | model as given | BLAS | steps | effective tok/s (wall) | tok per CPU-second | MLX peak GB | max RSS GB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for label, model, blas, r in (
            ("mlx_lm.lora", "4-bit", "stock (MLX wheel)", u),
            ("ft", "4-bit, dequantized to float32 by ft", f"{FAST_NAME} (ft preloads it)", f),
        ):
            print(
                f"| {label} | {model} | {blas} | {r['steps_run']} | {r['tok_s']:.2f} | {r['tok_cpu_s']:.2f} | "
                f"{r['mlx_peak_gb']:.2f} | {r['max_rss_gb']:.2f} |"
            )
        print(
            f"\nas a user runs it: ft / mlx_lm.lora = {f['tok_s'] / u['tok_s']:.1f}x wall, "
            f"{f['tok_cpu_s'] / u['tok_cpu_s']:.1f}x per CPU-second (target >= 20x)"
        )


if __name__ == "__main__":
    main()
