"""Preference training on CPU: a KTO and a DPO step against an SFT step, and ft's DPO against mlx-lm-lora's.

    python bench/preference_cpu.py                 # both comparisons
    python bench/preference_cpu.py --skip-lora     # the step-cost comparison only
    python bench/preference_cpu.py --pieces        # where a KTO step's time goes (its compiled pieces)

Model: the embedded SmolLM2-135M-Instruct as float32 (bench/train_cpu.py's ``prepare``), LoRA (rank 8,
alpha 16, q_proj+v_proj, all layers), AdamW, constant learning rate. Pairs: WikiSQL-like questions, the
right SQL as chosen, a wrong query as rejected, tokenized with the model's chat template (loss/log-probs
on the reply only).

1. Step cost, on the same tokens: SFT on the chosen and rejected replies (batch 2B sequences), DPO on the
   pairs (B pairs = the same 2B sequences; the reference pass with adapters off included), KTO on the
   same 2B replies labelled desirable/undesirable (plus its mismatched KL sequences), with the reference
   by adapters off (one forward pass without gradient per step in the first epoch: each prompt once, the
   reply and the mismatched reply on top; the policy's pass over the mismatched replies rides in the
   gradient pass on the same prompts) and cached (computed once before training, outside the timed
   steps). Median step time after the first steps (compilation). Target: DPO and KTO <= 1.6x SFT.
   ``--prompts own``: SFT and KTO on one reply per prompt (the chosen of one pair, the rejected of the
   next) instead of both sides of each pair; there KTO's replies share no prompt.
   ``--epochs N``: N epochs over the same pairs; from the second on, KTO and DPO reuse the reference
   kept per sequence in the first (no reference pass); printed: epoch 1, later epochs, and both
   averaged over the N epochs (the first epoch's reference passes counted).
2. ft's DPO against mlx-lm-lora's ``train_dpo`` (pip package ``mlx-lm-lora``, its reference a second
   copy of the model as its CLI loads it), same model, pairs, batch size, steps and BLAS (the one ``ft``
   picks, preloaded in both): tokens/s = non-padding tokens of both sides per wall second of the training
   loop (compilation included); peak memory = MLX's peak and the process's peak RSS. Targets: >= 1.5x
   tokens/s, peak memory <= mlx-lm-lora's.

Each measurement runs in its own subprocess, alternating, ``--rounds`` times; the best round counts (the
machine is shared: other jobs slow any single round).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from train_cpu import FAST_BLAS, FAST_NAME, prepare, wikisql_records  # noqa: E402


def _pairs(model_dir: str, n: int, seed: int, max_len: int) -> list[tuple[list[int], list[int], int]]:
    """(chosen ids, rejected ids, prompt length) per pair, through the model's chat template."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(Path(model_dir))
    r = random.Random(seed)
    out = []
    for rec in wikisql_records(n, seed):
        table = rec["completion"].split(" FROM ")[1].split(" ")[0]
        wrong = r.choice([f"SELECT * FROM {table}", f"SELECT COUNT(*) FROM {table}", "I cannot answer that."])
        user = [{"role": "user", "content": rec["prompt"]}]
        prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        sides = [
            tok.apply_chat_template([*user, {"role": "assistant", "content": c}], tokenize=True)
            for c in (rec["completion"], wrong)
        ]
        if max(len(s) for s in sides) <= max_len:
            out.append((list(sides[0]), list(sides[1]), len(prompt)))
    return out


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


def _lora_model_and_replies(a: argparse.Namespace) -> tuple:
    """The model with LoRA applied, both sides of the first ``steps x batch_size`` pairs as replies
    (loss on the reply only) and their labels (1 chosen, 0 rejected)."""
    import mlx.core as mx
    import numpy as np

    from ft.engine.batching import ArrayExamples
    from ft.engine.lora import AdapterSpec, apply_adapters
    from ft.models.loading import load

    model, _ = load(a.model)
    n = a.steps * a.batch_size
    toks, masks, labels = [], [], []
    if a.prompts == "shared":  # both sides of each pair: two replies per prompt
        sides = [
            (ids, lab, p)
            for c, rj, p in _pairs(a.model, a.examples, a.seed, a.max_seq_length)[:n]
            for ids, lab in ((c, 1), (rj, 0))
        ]
    else:  # one reply per prompt: the chosen of one pair, the rejected of the next
        pairs = _pairs(a.model, 2 * a.examples, a.seed, a.max_seq_length)[: 2 * n]
        if len(pairs) < 2 * n:
            raise SystemExit(f"--prompts own needs {2 * n} pairs, found {len(pairs)}: raise --examples")
        sides = [(c, 1, p) if k % 2 == 0 else (rj, 0, p) for k, (c, rj, p) in enumerate(pairs)]
    for ids, lab, p in sides:
        toks.append(ids)
        masks.append(np.arange(len(ids)) >= p)
        labels.append(lab)
    mx.random.seed(a.seed)
    apply_adapters(
        model, AdapterSpec(rank=a.rank, alpha=a.alpha, dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    return model, ArrayExamples(toks, masks), labels


def worker_ft(a: argparse.Namespace) -> dict:
    import mlx.core as mx
    import numpy as np

    from ft.engine.batching import BatchOptions
    from ft.engine.objectives import PreferenceOptions
    from ft.engine.optim import OptimizerSpec, build_optimizer
    from ft.engine.preference import PreferenceData, consecutive_pairs
    from ft.engine.trainer import TrainOptions, train

    model, seqs, labels = _lora_model_and_replies(a)
    toks = [seqs.tokens(i) for i in range(len(seqs))]
    opt = build_optimizer(OptimizerSpec(name="adamw", weight_decay=0.0), a.lr)
    objective = None
    data: object = seqs
    batch = 2 * a.batch_size  # SFT/KTO: the 2B sequences of B pairs
    if a.worker == "ft-dpo":
        objective = PreferenceOptions("dpo", beta=0.1)
        data = PreferenceData(seqs, np.array(labels, np.int8), consecutive_pairs(len(toks)))
        batch = a.batch_size
    elif a.worker in ("ft-kto", "ft-kto-cached"):
        objective = PreferenceOptions("kto", beta=0.1)
        data = PreferenceData(seqs, np.array(labels, np.int8))
    extra: dict = {}
    cache_seconds = 0.0
    if (
        a.worker == "ft-kto-cached"
    ):  # the reference computed once before training (what full fine-tuning does)
        from ft.engine.losses import check_model
        from ft.engine.preference import Units, compute_reference

        bo = BatchOptions(batch_size=batch, max_seq_length=a.max_seq_length, seed=a.seed, shuffle=False)
        t0 = time.perf_counter()
        cache = compute_reference(
            model, check_model(model), Units(data, objective, a.max_seq_length, a.seed), bo
        )
        cache_seconds = time.perf_counter() - t0
        extra = {"reference": "cached", "ref_cache": (cache, None)}
    times: list[float] = []
    seen = {"tokens": 0}

    class Count:
        def on_step(self, e):  # type: ignore[no-untyped-def]
            times.append(e.step_seconds)

    opts = TrainOptions(
        BatchOptions(batch_size=batch, max_seq_length=a.max_seq_length, seed=a.seed, shuffle=False),
        total_steps=a.steps * a.epochs,
        eval_at_start=False,
        log_steps=a.steps,
        max_grad_norm=0.0,
    )
    # One epoch over exactly steps x batch pairs: every objective trains on the same tokens.
    seen["tokens"] = sum(len(t) for t in toks)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    train(model, opt, data, None, opts, callbacks=[Count()], objective=objective, **extra)  # type: ignore[arg-type]
    dt = time.perf_counter() - t0
    steady = times[a.warmup : a.steps] or times[: a.steps]  # epoch 1 (every reference pass computed)
    later = times[a.steps :] or steady  # epochs 2.. (the reference of every sequence kept from epoch 1)
    return {
        "seconds": dt,
        "tokens": seen["tokens"],
        "step_median": statistics.median(steady),
        "step_mean": statistics.mean(steady),
        "later_median": statistics.median(later),
        "amortized": (statistics.median(steady) + (a.epochs - 1) * statistics.median(later)) / a.epochs,
        "cache_seconds": cache_seconds,
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
        "rss_peak_gb": _rss_gb(),
    }


def worker_pieces(a: argparse.Namespace) -> dict:
    """Where a KTO step's time goes: the compiled pieces of its first step, timed interleaved (``--reps``
    times each, median) against SFT's compiled gradient pass on the same replies."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from ft.engine.batching import BatchOptions, collate
    from ft.engine.losses import check_model, make_loss
    from ft.engine.objectives import PreferenceOptions
    from ft.engine.preference import (
        PreferenceData,
        PreferenceSteps,
        collate_slots,
        shared_context,
        unit_arrays,
    )

    model, seqs, labels = _lora_model_and_replies(a)
    split = check_model(model)
    B = 2 * a.batch_size
    bo = BatchOptions(batch_size=B, max_seq_length=a.max_seq_length, seed=a.seed, shuffle=False)
    data = PreferenceData(seqs, np.array(labels, np.int8))
    ps = PreferenceSteps(model, split, PreferenceOptions("kto", beta=0.1), bo, data, None)
    units, sp = ps.units, ps.plans_for(0)[0]
    micro = sp.micro_batches[0]
    sc = shared_context(units, micro.units, B, 0)
    ua, _ = unit_arrays(units, micro.units, B)
    zeros = mx.zeros(B)
    kto_args = (
        *sc.arrays,
        ua.slot_a,
        ua.slot_b,
        ua.desirable,
        ua.umask,
        zeros,
        zeros,
        zeros,
        *ps._norms(units, sp),
    )
    value_grad = nn.value_and_grad(model, make_loss(split))
    st = [model.state, mx.random.state]
    sft_grad = mx.compile(lambda *x: value_grad(model, *x), inputs=st, outputs=st)
    mb = collate(units.all, micro.plan, units.index, 0, bo.target_step)
    seg = mx.array(mb.segments) if mb.segments is not None else None
    sft_args = (mx.array(mb.inputs), seg, mx.array(mb.positions), mx.array(mb.labels), mx.array(mb.weights))
    pa, _ = ps._collate(units, micro)
    kl = collate_slots(units, micro.kl_plan, [units.kl_of(u) for u in micro.units], B, 0, bo.target_step)
    pieces = {
        "sft gradient pass": lambda: sft_grad(*sft_args, mx.array(1.0)),
        "kto gradient pass (KL replies fused)": lambda: ps._fns["grad_kto_shared"](*kto_args),
        "reference, shared prompt (replies + KL replies)": lambda: ps._fns["ref_shared"](*sc.arrays),
        "before: reference on the replies": lambda: ps._fns["ref"](*pa.tokens_args()),
        "before: policy on the KL sequences": lambda: ps._fns["policy"](*kl.tokens_args()),
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for r in range(a.reps + 2):  # two rounds of compilation and warm-up, not counted
        for k, f in pieces.items():
            t0 = time.perf_counter()
            mx.eval(f())
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shapes": f"prompts {tuple(sc.arrays[0].shape)}, replies {tuple(sc.arrays[3].shape)}", **med}


def worker_lora(a: argparse.Namespace) -> dict:
    """mlx-lm-lora's DPO trainer as its own CLI sets it up: LoRA on the policy, a second model as reference."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    pairs = _pairs(a.model, a.examples, a.seed, a.max_seq_length)[: a.steps * a.batch_size]
    dataset = [
        {"chosen": c, "rejected": rj, "chosen_prompt_length": p, "rejected_prompt_length": p}
        for c, rj, p in pairs
    ]
    model, _ = load(a.model)
    ref, _ = load(a.model)
    ref.freeze()
    mx.random.seed(a.seed)
    model.freeze()
    linear_to_lora_layers(
        model,
        len(model.layers),
        {
            "rank": a.rank,
            "scale": a.alpha / a.rank,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
    )
    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:  # its trainer wires memory with it; CPUs lack the key
        mx.device_info = lambda: {**info, "max_recommended_working_set_size": 0}  # type: ignore[assignment]
        mx.set_wired_limit = lambda *_a, **_k: 0  # type: ignore[assignment]
    opt = optim.AdamW(learning_rate=a.lr, weight_decay=0.0)
    with tempfile.TemporaryDirectory() as d:
        args = DPOTrainingArgs(
            batch_size=a.batch_size,
            iters=a.steps,
            val_batches=0,
            steps_per_report=a.steps,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=a.max_seq_length,
            adapter_file=str(Path(d) / "adapters.safetensors"),
            beta=0.1,
        )
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        train_dpo(model, ref, opt, dataset, None, args=args)
        dt = time.perf_counter() - t0
    # Its batches are the pairs sorted by length, B at a time (random order): tokens of the pairs it drew
    # are counted as the mean pair times the pairs trained (both sides, no padding).
    mean_pair = statistics.mean(len(c) + len(rj) for c, rj, _ in pairs)
    return {
        "seconds": dt,
        "tokens": mean_pair * a.steps * a.batch_size,
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
        "rss_peak_gb": _rss_gb(),
    }


def run_worker(worker: str, model: Path, a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["FT_NO_BLAS_PRELOAD"] = "1"
    if FAST_BLAS is not None:
        env["LD_PRELOAD"] = str(FAST_BLAS)
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", worker, "--model", str(model), "--out", out.name]
        for k in (
            "steps",
            "batch_size",
            "max_seq_length",
            "rank",
            "alpha",
            "lr",
            "seed",
            "examples",
            "warmup",
            "epochs",
            "reps",
            "prompts",
        ):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{worker} worker failed ({proc.returncode})")
        res = json.loads(Path(out.name).read_text())
    if "tokens" in res:
        res["tok_s"] = res["tokens"] / res["seconds"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["ft-sft", "ft-dpo", "ft-kto", "ft-kto-cached", "lora-dpo", "pieces"])
    p.add_argument("--model")
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the median (compilation)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="epochs over the same pairs: later epochs reuse the reference kept from the first",
    )
    p.add_argument(
        "--workers", default="", help="comma-separated subset of ft-sft,ft-dpo,ft-kto,ft-kto-cached"
    )
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument(
        "--pieces", action="store_true", help="only: where a KTO step's time goes (see worker_pieces)"
    )
    p.add_argument(
        "--prompts",
        choices=["shared", "own"],
        default="shared",
        help="replies for SFT and KTO: both sides of each pair (two replies per prompt, KTO data made from "
        "pairs) or one reply per prompt (labelled conversations); DPO needs shared",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--work", default=str(ROOT / ".bench" / "train_cpu"))
    a = p.parse_args()
    if a.worker:
        fn = {"lora-dpo": worker_lora, "pieces": worker_pieces}.get(a.worker, worker_ft)
        Path(a.out).write_text(json.dumps(fn(a)))
        return
    _, f32, _ = prepare(Path(a.work), 16, a.seed)
    if a.pieces:
        r = run_worker("pieces", f32, a)
        print(f"KTO step pieces ({r.pop('shapes')}), median of {a.reps}, interleaved:")
        sft = r["sft gradient pass"]
        for k, v in r.items():
            if isinstance(v, float) and k not in ("tokens", "seconds", "tok_s"):
                print(f"  {k}: {v:.3f} s = {v / sft:.2f}x the SFT gradient pass")
        return
    print(
        f"model {f32} (float32), BLAS {FAST_NAME}, {a.batch_size} pairs per step, {a.steps} steps, "
        f"{'two replies' if a.prompts == 'shared' else 'one reply'} per prompt"
    )
    best: dict[str, dict] = {}
    workers = a.workers.split(",") if a.workers else ["ft-sft", "ft-dpo", "ft-kto", "ft-kto-cached"]
    workers += [] if a.skip_lora else ["lora-dpo"]
    if a.prompts == "own" and {"ft-dpo", "lora-dpo"} & set(workers):
        raise SystemExit("--prompts own has no pairs: run it with --skip-lora --workers ft-sft,ft-kto")
    for rnd in range(a.rounds):
        for w in workers:
            r = run_worker(w, f32, a)
            key = "step_median" if w != "lora-dpo" else "seconds"
            if w not in best or r[key] < best[w][key]:
                best[w] = r
            print(f"round {rnd + 1} {w}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    sft = best["ft-sft"]["step_median"]
    print("\nstep cost on the same tokens (median step, LoRA, reference pass included):")
    for w in (w for w in ("ft-sft", "ft-dpo", "ft-kto", "ft-kto-cached") if w in best):
        b = best[w]
        line = f"  {w}: epoch 1 {b['step_median']:.3f} s = {b['step_median'] / sft:.2f}x SFT (target <= 1.6x)"
        if a.epochs > 1:
            later = best["ft-sft"]["later_median"]
            line += (
                f"; epochs 2-{a.epochs} {b['later_median']:.3f} s = {b['later_median'] / later:.2f}x; "
                f"over {a.epochs} epochs {b['amortized'] / best['ft-sft']['amortized']:.2f}x"
            )
        print(line)
    if not a.skip_lora:
        f, m = best["ft-dpo"], best["lora-dpo"]
        print("\nDPO, ft vs mlx-lm-lora (same model, pairs, batch, steps and BLAS):")
        print(
            f"  tokens/s: ft {f['tok_s']:.0f}, mlx-lm-lora {m['tok_s']:.0f}: {f['tok_s'] / m['tok_s']:.2f}x (target >= 1.5x)"
        )
        print(
            f"  peak memory: MLX {f['mlx_peak_gb']:.2f} vs {m['mlx_peak_gb']:.2f} GB ({f['mlx_peak_gb'] / m['mlx_peak_gb']:.2f}x), "
            f"RSS {f['rss_peak_gb']:.2f} vs {m['rss_peak_gb']:.2f} GB ({f['rss_peak_gb'] / m['rss_peak_gb']:.2f}x) (target <= 1x)"
        )


if __name__ == "__main__":
    main()
