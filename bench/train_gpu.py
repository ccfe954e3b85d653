"""Training throughput on one NVIDIA GPU: ft's engine vs mlx-lm's LoRA trainer vs transformers+peft.

    python3 bench/train_gpu.py                      # all three engines, one subprocess each
    python3 bench/train_gpu.py --engines ft,mlx_lm  # a subset
    python3 bench/train_gpu.py --shape tiny --steps 6      # a quick check of the script itself

Setup on the GPU host (MLX's CUDA wheel, no registry access): see ../shared/gpu/README.md; this script
needs only MLX + mlx-lm (ft's engine is imported from ./src, PYTHONPATH=src), and torch + transformers
+ peft for the third engine.

What runs, the brief's setting: a Mistral-7B-shaped model with random bf16 weights; LoRA rank 16,
alpha 32 on q_proj and v_proj of every layer; AdamW lr 1e-4; 8 examples per optimizer step (batch 2 x
accumulation 4 for mlx-lm and transformers; ft lays the same 8 examples out itself: packed or grouped
rows, at most 2 x max_seq_length tokens per micro-batch). The records have the sample data's chat shape
(a system prompt shared by all, a user turn, an assistant reply that is trained; prompt tokens are
masked) with lengths like the brief's tool-use conversations: log-normal, median ~260 tokens, p90 ~470,
and 2% past 2,048. Every engine trains on the same token ids.

* ft: ``ft.engine.trainer.train`` (compiled step, bucketed shapes - coarse on a GPU -, loss on trained
  tokens only).
* mlx-lm: ``mlx_lm.tuner.trainer.train`` with its own length-sorted batches (``--mask-prompt`` loss).
* transformers+peft: batches of 2 padded to the longest (what a Trainer does with
  DataCollatorForSeq2Seq), labels -100 on prompt and padding, accumulation 4, torch AdamW (fused); in
  three configurations: eager attention in random order (``hf_eager``), the attention a user gets by
  default (``hf_sdpa``), and sdpa with a Trainer's ``group_by_length`` order (``hf_sdpa_grouped``).

Every configuration also runs with gradient checkpointing (``+ckpt``: ft's
``training.gradient_checkpointing``; transformers' ``gradient_checkpointing_enable``, non-reentrant). ft's
speed is compared with the fastest transformers+peft configuration and its memory with the leanest, with
checkpointing on for all and off for all. The first ft process on a fresh GPU host compiles MLX's kernels:
"with warm-up" and "first step s" show it (run on a fresh host for the first-run figure).

Reported per engine: effective tokens/s (non-padding tokens of the examples trained on per second of
wall time, after ``--warmup`` optimizer steps), peak GPU memory, and MFU = 4 x parameters x tokens/s /
989 TFLOP/s (dense bf16 of an H100 SXM or H200). Targets: ft >= 2x mlx-lm and >= 3x transformers+peft, with peak memory
no higher than transformers+peft's. Paste the printed table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_FLOPS = 989e12
SHAPES = {
    "mistral7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
        tie_word_embeddings=False,
        rope_theta=1_000_000.0,
    ),
    "smol135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100_000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
        rope_theta=10_000.0,
    ),
}


def n_params(shape: dict) -> int:
    h, i, n, v = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
        shape["vocab_size"],
    )
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i) + v * h * (1 if shape["tie_word_embeddings"] else 2)


def make_records(n: int, vocab: int, seed: int, system_tokens: int = 24) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) pairs: a shared system prompt, a user turn, a trained assistant reply."""
    import numpy as np

    rng = np.random.default_rng(seed)
    system = rng.integers(100, vocab, size=system_tokens).tolist()
    out = []
    sigma = math.log(470 / 260) / 1.2816  # p90 / median of a log-normal
    for _ in range(n):
        total = int(rng.lognormal(math.log(260), sigma))
        if rng.random() < 0.02:
            total = int(rng.integers(2100, 3200))  # the long tail past 2,048
        total = max(system_tokens + 8, total)
        user = max(4, int((total - system_tokens) * rng.uniform(0.3, 0.7)))
        reply = max(2, total - system_tokens - user)
        ids = system + rng.integers(100, vocab, size=user + reply).tolist()
        out.append((ids, system_tokens + user))
    return out


# ---------------------------------------------------------------- engines (each in its own process)
def _mlx_model(shape: dict):  # type: ignore[no-untyped-def]
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, **shape))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def folder_info_of(model, shape: dict):  # type: ignore[no-untyped-def]
    """A FolderInfo (config + tensor headers) for a model built in memory: what the memory plan reads from files."""
    from mlx.utils import tree_flatten

    from ft.models.inspect import FolderInfo, TensorInfo

    tensors = {}
    for name, v in tree_flatten(model.parameters()):
        tensors[name] = TensorInfo(name, str(v.dtype).split(".")[-1], tuple(v.shape), v.nbytes)
    return FolderInfo(config={"model_type": "llama", **shape}, tensors=tensors)


def run_ft(a: argparse.Namespace, records: list) -> dict:
    import dataclasses

    import mlx.core as mx

    from ft.config.train import TrainConfig
    from ft.engine.batching import ArrayExamples, BatchOptions, attention_cost
    from ft.engine.lora import AdapterSpec, apply_adapters
    from ft.engine.optim import OptimizerSpec, build_optimizer
    from ft.engine.trainer import TrainOptions, plan_run, train
    from ft.models.memory import estimate_training_memory

    shape = SHAPES[a.shape]
    model = _mlx_model(shape)
    info = folder_info_of(model, shape)  # the base model's tensors, before adapters
    apply_adapters(
        model, AdapterSpec(method="lora", rank=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    data = ArrayExamples([r[0] for r in records], [[j >= r[1] for j in range(len(r[0]))] for r in records])
    opt = build_optimizer(OptimizerSpec(name="adamw", weight_decay=0.0), a.lr)
    packing = {"auto": None, "true": True, "false": False}[a.ft_packing]
    timeline: list[tuple[float, int]] = []

    step_secs: list[float] = []
    step_mbs: list[int] = []
    start: dict = {}

    class Clock:
        def on_train_start(self, e):  # type: ignore[no-untyped-def]
            start.update(
                padding=round(e.padding_fraction, 3),
                distinct_shapes=e.distinct_shapes,
                packing=e.packing,
                logits_on_targets_only=e.logits_on_targets_only,
                notes=e.notes,
            )

        def on_step(self, e):  # type: ignore[no-untyped-def]
            timeline.append((time.perf_counter(), e.tokens + e.examples))
            step_secs.append(e.step_seconds)
            step_mbs.append(e.micro_batches)

    phases = _time_trainer_phases() if a.profile else None
    coarse = {"auto": None, "coarse": True, "fine": False}[a.ft_shapes]
    bopts = BatchOptions(
        batch_size=2,
        grad_accumulation_steps=4,
        max_seq_length=a.max_seq_length,
        packing=packing,
        share_prefix=a.ft_prefix == "on",
        attention_cost=attention_cost(shape),
        coarse_shapes=coarse,
    )
    opts = TrainOptions(
        bopts,
        total_steps=a.steps,
        eval_at_start=False,
        log_steps=a.steps,
        max_grad_norm=0.0,
        gradient_checkpointing=a.checkpointing,
    )
    # The memory plan of the run and the limit `ft train` holds MLX to (ft.services.train_setup does the same).
    rp = plan_run(data, None, opts)
    cfg = TrainConfig.model_validate(
        {
            "model": {"dtype": "bfloat16"},
            "training": {
                "method": "lora",
                "batch_size": 2,
                "grad_accumulation_steps": 4,
                "gradient_checkpointing": a.checkpointing,
            },
            "data": {"max_seq_length": a.max_seq_length},
            "lora": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    available = int(mx.device_info().get("free_memory") or 80e9)
    est = estimate_training_memory(
        info,
        cfg,
        available_bytes=available,
        on_cpu=False,
        micro_batch=rp.largest_micro_batch,
        targets=rp.largest_targets,
    )
    if a.ft_memory_limit == "plan":
        opts = dataclasses.replace(opts, memory_limit_bytes=est.working_limit_bytes or None)
    t0 = time.perf_counter()
    train(model, opt, data, None, opts, callbacks=[Clock()])
    out = _summary(t0, timeline, a.warmup, mx.get_peak_memory() / 1e9)
    out["memory_plan"] = {
        "largest_micro_batch": list(rp.largest_micro_batch),
        "plan_gb": round(est.total_bytes / 1e9, 3),
        "limit_gb": round((opts.memory_limit_bytes or 0) / 1e9, 3),
    }
    if phases is not None:
        out["phases_s"] = {k: round(v, 2) for k, v in phases.items()}
    # What the trainer planned and ran (after its known-answer checks on the model).
    slow = sorted(range(len(step_secs)), key=lambda k: -step_secs[k])[:6]
    out["step_seconds"] = [round(x, 3) for x in step_secs]
    out["in_step_seconds"] = round(
        sum(step_secs[a.warmup :]), 2
    )  # collate + compiled step, callbacks excluded
    out["plan"] = {
        **start,
        "micro_batches": sum(step_mbs),
        "slowest": [(k, round(step_secs[k], 2), step_mbs[k]) for k in slow],
    }
    return out


def _time_trainer_phases() -> dict[str, float]:
    """Wrap the trainer's calls (eval, collate, grad, apply, memory sample, callbacks) with wall timers."""
    import ft.engine.trainer as T

    acc: dict[str, float] = {}

    def timed(name, fn):  # type: ignore[no-untyped-def]
        def w(*args, **kw):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t

        return w

    class Mx:  # the trainer's `mx`, with eval timed
        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            import mlx.core as mx

            v = getattr(mx, name)
            return timed(name, v) if name == "eval" else v

    T.mx = Mx()
    T.collate = timed("collate", T.collate)
    T._to_mx = timed("to_mx", T._to_mx)
    T.dispatch = timed("dispatch", T.dispatch)
    T.memory_mod = type("M", (), {"sample": staticmethod(timed("memory", T.memory_mod.sample))})
    T.StepFunctions.grad = timed("grad_call", T.StepFunctions.grad)
    T.StepFunctions.apply = timed("apply_call", T.StepFunctions.apply)
    T.current_lr = timed("current_lr", T.current_lr)
    return acc


def run_mlx_lm(a: argparse.Namespace, records: list) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    shape = SHAPES[a.shape]
    model = _mlx_model(shape)
    model.freeze()
    linear_to_lora_layers(
        model,
        shape["num_hidden_layers"],
        {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
    )

    class Cached:  # what CacheDataset holds: (tokens, prompt offset) per record
        def __len__(self) -> int:
            return len(records)

        def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
            return records[i]

    timeline: list[tuple[float, int]] = []
    pending = {"tokens": 0, "micro": 0}

    def batches(**kw):  # type: ignore[no-untyped-def]
        for batch, lengths in iterate_batches(**kw):
            pending["tokens"] += sum(min(int(l1), a.max_seq_length) for _, l1 in lengths.tolist())
            pending["micro"] += 1
            if (
                pending["micro"] > 1 and (pending["micro"] - 1) % 4 == 0
            ):  # the previous optimizer step is done
                timeline.append((time.perf_counter(), pending.pop("step_tokens", 0)))
            pending["step_tokens"] = pending.get("step_tokens", 0) + sum(
                min(int(l1), a.max_seq_length) for _, l1 in lengths.tolist()
            )
            yield batch, lengths

    opt = optim.AdamW(learning_rate=a.lr, weight_decay=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(
            batch_size=2,
            iters=4 * a.steps,
            steps_per_report=10**9,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=a.max_seq_length,
            grad_accumulation_steps=4,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
        )
        t0 = time.perf_counter()
        train(model, opt, Cached(), None, args, iterate_batches=batches)
    timeline.append((time.perf_counter(), pending.get("step_tokens", 0)))
    return _summary(t0, timeline, a.warmup, mx.get_peak_memory() / 1e9)


def run_torch(a: argparse.Namespace, records: list) -> dict:
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[a.shape]
    cfg = LlamaConfig(rms_norm_eps=1e-5, attn_implementation=a.torch_attention, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if a.checkpointing:  # what a Trainer does with gradient_checkpointing=True on a PEFT model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0, fused=True
    )
    rng = random.Random(0)
    order: list[int] = []
    timeline: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step_tokens = 0
        for _ in range(4):
            if len(order) < 2:
                perm = rng.sample(range(len(records)), len(records))  # a Trainer's random sampler, per epoch
                if a.torch_group:
                    perm = group_by_length(perm, [len(r[0]) for r in records], 2)
                order = perm[::-1] + order  # popped from the end: perm's order
            batch = [records[order.pop()] for _ in range(2)]
            batch = [(ids[: a.max_seq_length], off) for ids, off in batch]
            L = max(len(ids) for ids, _ in batch)  # pad to the longest in the batch
            x = torch.zeros((2, L), dtype=torch.long)
            y = torch.full((2, L), -100, dtype=torch.long)
            att = torch.zeros((2, L), dtype=torch.long)
            for r, (ids, off) in enumerate(batch):
                x[r, : len(ids)] = torch.tensor(ids)
                y[r, off : len(ids)] = torch.tensor(ids[off:])
                att[r, : len(ids)] = 1
                step_tokens += len(ids)
            out = model(input_ids=x.cuda(), attention_mask=att.cuda(), labels=y.cuda())
            (out.loss / 4).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        timeline.append((time.perf_counter(), step_tokens))
    return _summary(t0, timeline, a.warmup, torch.cuda.max_memory_allocated() / 1e9)


def group_by_length(perm: list[int], lengths: list[int], batch: int, mult: int = 50) -> list[int]:
    """A Trainer's ``group_by_length`` order: the shuffled indices cut into groups of ``mult`` batches,
    each group sorted longest first, and the group holding the longest example moved to the front (so an
    out-of-memory shows at once)."""
    size = mult * batch
    groups = [sorted(perm[k : k + size], key=lambda i: -lengths[i]) for k in range(0, len(perm), size)]
    top = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
    groups[0], groups[top] = groups[top], groups[0]
    return [i for g in groups for i in g]


def _summary(t0: float, timeline: list[tuple[float, int]], warmup: int, peak_gb: float) -> dict:
    """Tokens/s after ``warmup`` optimizer steps (compilation and allocator warm-up excluded for all)."""
    warmup = min(warmup, len(timeline) - 1)
    start = timeline[warmup - 1][0] if warmup > 0 else t0
    toks = sum(n for _, n in timeline[warmup:])
    secs = timeline[-1][0] - start
    total = sum(n for _, n in timeline)
    return {
        "tok_s": toks / secs,
        "tokens": toks,
        "seconds": secs,
        "steps": len(timeline),
        "peak_gb": peak_gb,
        "tok_s_with_warmup": total / (timeline[-1][0] - t0),
    }


ENGINES = {"ft": run_ft, "mlx_lm": run_mlx_lm, "transformers_peft": run_torch}
# A configuration: an engine and its options. "+ckpt" = gradient checkpointing on.
CONFIGS = {
    "ft": ("ft", {}),
    "mlx_lm": ("mlx_lm", {}),
    "transformers_peft": ("transformers_peft", {"torch_attention": "eager"}),  # the name earlier runs used
    "hf_eager": ("transformers_peft", {"torch_attention": "eager"}),
    "hf_sdpa": ("transformers_peft", {"torch_attention": "sdpa"}),
    "hf_sdpa_grouped": ("transformers_peft", {"torch_attention": "sdpa", "torch_group": True}),
}


def parse_config(name: str) -> tuple[str, dict]:
    base, _, extra = name.partition("+")
    if base not in CONFIGS or extra not in ("", "ckpt"):
        raise SystemExit(
            f"unknown configuration {name!r}: one of {', '.join(CONFIGS)}, each optionally +ckpt"
        )
    engine, opts = CONFIGS[base]
    return engine, {
        "torch_attention": "eager",
        "torch_group": False,
        **opts,
        "checkpointing": extra == "ckpt",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--engines",
        default="ft,ft+ckpt,mlx_lm,hf_eager,hf_sdpa,hf_sdpa_grouped,hf_eager+ckpt,hf_sdpa+ckpt,hf_sdpa_grouped+ckpt",
        help="configurations, comma-separated: ft, mlx_lm, hf_eager, hf_sdpa, hf_sdpa_grouped (Trainer's "
        "group_by_length), each optionally +ckpt (gradient checkpointing)",
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="mistral7b")
    p.add_argument(
        "--steps",
        type=int,
        default=125,
        help="optimizer steps per engine (8 examples each; 125 = one epoch of 1,000 records)",
    )
    p.add_argument("--warmup", type=int, default=4, help="optimizer steps not timed")
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--max-seq-length", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ft-packing", choices=["auto", "true", "false"], default="auto")
    p.add_argument(
        "--ft-shapes",
        choices=["auto", "coarse", "fine"],
        default="auto",
        help="ft's shape ladder (auto = coarse on a GPU)",
    )
    p.add_argument(
        "--ft-prefix", choices=["on", "off"], default="on", help="ft runs a shared system prompt once"
    )
    p.add_argument(
        "--ft-memory-limit",
        choices=["plan", "none"],
        default="plan",
        help="plan: ft holds MLX to its memory plan's limit, as ft train does; none: MLX's default",
    )
    p.add_argument("--json-out", help="also write every engine's full result here")
    p.add_argument(
        "--profile", action="store_true", help="run each engine under cProfile (top 30 in the JSON)"
    )
    p.add_argument("--worker")
    p.add_argument("--out")
    a = p.parse_args()
    shape = SHAPES[a.shape]
    records = make_records(a.records, shape["vocab_size"], a.seed)
    if a.worker:
        engine, extra = parse_config(a.worker)
        for k, v in extra.items():
            setattr(a, k, v)
        if a.profile:  # where the host's time goes (time waiting on the GPU shows up in eval/item)
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            res = prof.runcall(ENGINES[engine], a, records)
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
            res["profile"] = buf.getvalue()
        else:
            res = ENGINES[engine](a, records)
        Path(a.out).write_text(json.dumps(res))
        return

    lens = sorted(len(r[0]) for r in records)
    print(
        f"# {a.shape} ({n_params(shape) / 1e9:.2f}B params, random bf16), LoRA r16 alpha 32 q+v, 8 examples/step, "
        f"{a.steps} steps ({a.warmup} untimed); records: median {lens[len(lens) // 2]}, "
        f"p90 {lens[int(len(lens) * 0.9)]}, max {lens[-1]} tokens",
        flush=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    results = {}
    for eng in a.engines.split(","):
        parse_config(eng)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                eng,
                "--out",
                out.name,
                "--shape",
                a.shape,
                "--steps",
                str(a.steps),
                "--warmup",
                str(a.warmup),
                "--records",
                str(a.records),
                "--max-seq-length",
                str(a.max_seq_length),
                "--lr",
                str(a.lr),
                "--seed",
                str(a.seed),
                "--ft-packing",
                a.ft_packing,
                "--ft-shapes",
                a.ft_shapes,
                "--ft-prefix",
                a.ft_prefix,
                "--ft-memory-limit",
                a.ft_memory_limit,
            ]
            cmd += ["--profile"] if a.profile else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(
                    f"{eng}: FAILED ({proc.returncode})\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}",
                    flush=True,
                )
                continue
            results[eng] = json.loads(Path(out.name).read_text())
            r = results[eng]
            print(
                f"  {eng}: {r['tok_s']:,.0f} tok/s, peak {r['peak_gb']:.1f} GB, timed {r['seconds']:.2f} s"
                + (f" (in-step {r['in_step_seconds']} s)" if "in_step_seconds" in r else "")
                + (f", plan {r['plan']}" if "plan" in r else ""),
                flush=True,
            )
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    N = n_params(shape)
    print("\n| configuration | effective tok/s | with warm-up | first step s | peak GB | MFU |")
    print("|---|---|---|---|---|---|")
    for eng, r in results.items():
        mfu = 4 * N * r["tok_s"] / H100_BF16_FLOPS
        first = f"{r['step_seconds'][0]:.1f}" if r.get("step_seconds") else "-"
        print(
            f"| {eng} | {r['tok_s']:,.0f} | {r['tok_s_with_warmup']:,.0f} | {first} | {r['peak_gb']:.1f} "
            f"| {100 * mfu:.1f}% |"
        )
    print()
    for ckpt in ("", "+ckpt"):
        mine = results.get("ft" + ckpt)
        torch_runs = {
            k: r
            for k, r in results.items()
            if parse_config(k)[0] == "transformers_peft" and k.endswith("+ckpt") == bool(ckpt)
        }
        if mine and torch_runs:
            fastest = max(torch_runs, key=lambda k: torch_runs[k]["tok_s"])
            leanest = min(torch_runs, key=lambda k: torch_runs[k]["peak_gb"])
            print(
                f"ft{ckpt}: {mine['tok_s'] / torch_runs[fastest]['tok_s']:.2f}x the fastest transformers+peft "
                f"configuration ({fastest}), peak memory {mine['peak_gb'] / torch_runs[leanest]['peak_gb']:.2f}x "
                f"the leanest ({leanest})"
            )
        if mine and "mlx_lm" in results and not ckpt:
            print(f"ft / mlx_lm: {mine['tok_s'] / results['mlx_lm']['tok_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
