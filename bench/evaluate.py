"""Evaluation throughput on the embedded SmolLM2: ft's evaluation engine against mlx-lm's own, same records.

    python bench/evaluate.py                      # 128 records scored, 16 prompts x 64 tokens, 2 rounds
    python bench/evaluate.py --records 64 --prompts 8 --rounds 1

Setup (not timed): a scratch workspace, the embedded SmolLM2-135M-Instruct imported (`ft models pull`),
the sample conversations `ft init` writes prepared by the real data pipeline (chat template, loss on the
replies), and the model loaded the way `ft evaluate` loads it on CPU (float32, dequantized).

Timed, each ``--rounds`` times alternating, best round counts (other jobs share the machine):

1. Scoring (validation loss over the replies' tokens) of the same ``--records`` records:
   ft ``ft.engine.evaluate.score`` (packed rows, logits only at trained positions, per-record sums) vs
   the anchor ``mlx_lm.tuner.trainer.evaluate`` with its ``iterate_batches`` and ``default_loss`` (padded
   rows, full logits; its mask's off-by-one at the end of each sequence fixed, so the two losses are
   the same quantity and must agree), both at batch size ``--batch-size``. Records/s.
2. Generation on the same ``--prompts`` prompts (each conversation up to its reply), greedy, at most
   ``--max-tokens`` tokens, stopping at EOS: ft ``ft.engine.evaluate.generate`` (mlx-lm's
   BatchGenerator, ``--batch-size`` sequences at once) vs the anchor ``mlx_lm.generate.stream_generate``
   one prompt at a time (what ``mlx_lm.generate`` does). Generated tokens per wall second (prompt
   processing included), and how many replies are identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
MODEL = "smollm2-135m-instruct"


def _setup(tmp: Path, records: int, prompts: int):  # noqa: ANN202
    import numpy as np

    from ft.data.metrics import prompt_cases
    from ft.engine.batching import ArrayExamples
    from ft.models.loading import load_model_dir
    from ft.services import dataset_prepare, models
    from ft.services.project import init_workspace
    from ft.workspace import Workspace

    root = tmp / "ws"
    init_workspace(root)
    ws = Workspace(root)
    models.pull(ws, MODEL)
    ds = dataset_prepare.prepare_dataset(
        ws, "data/sample.jsonl", name="sample", model=MODEL, data={"val_split": 0.0}
    )
    from ft.data.store import load_split

    split = load_split(ds.splits["train"])
    # Records whose trained tokens run from the first reply token to the end (one reply): mlx-lm's dataset
    # format (tokens, offset) can only express those, and the two losses must be the same quantity.
    keep = []
    for i in range(len(split)):
        hits = np.flatnonzero(split.mask(i))
        if len(hits) and hits[-1] == len(split.mask(i)) - 1 and len(hits) == hits[-1] - hits[0] + 1:
            keep.append(i)
    keep = keep[:records]
    data = ArrayExamples([split.tokens(i) for i in keep], [split.mask(i) for i in keep])
    cases = prompt_cases(split, prompts)
    loaded = load_model_dir(ws.model_dir(MODEL), dequantize=True, dtype="float32")
    return loaded.model, loaded.tokenizer, data, cases


def _time(fn):  # noqa: ANN001, ANN202
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if (
        sys.platform.startswith("linux")
        and os.path.exists(OPENBLAS)
        and OPENBLAS not in os.environ.get("LD_PRELOAD", "")
    ):
        os.environ["LD_PRELOAD"] = OPENBLAS  # the same fast BLAS `ft` preloads for itself
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import stream_generate
    from mlx_lm.tuner.trainer import evaluate as mlx_evaluate

    from ft.engine import evaluate as ev

    with tempfile.TemporaryDirectory(prefix="ft-bench-eval-") as tmp:
        print("setting up (import model, prepare data, load float32)...", flush=True)
        model, tok, data, cases = _setup(Path(tmp), args.records, args.prompts)
    n = len(data) - len(data) % args.batch_size  # mlx-lm drops a last partial batch: score the same records
    data = type(data)([data.tokens(i) for i in range(n)], [data.mask(i) for i in range(n)])
    # mlx-lm's dataset items: (tokens, offset of the first trained token) -- the sample data has one reply each.
    mlx_items = [(list(map(int, data.tokens(i))), int(np.flatnonzero(data.mask(i))[0])) for i in range(n)]
    tokens_in = int(sum(len(t) - 1 for t, _ in mlx_items))
    prompts = [c.prompt for c in cases]
    eos = tuple(sorted(int(t) for t in tok.eos_token_ids))
    opts = ev.SamplingOptions(max_tokens=args.max_tokens, batch_size=args.batch_size, stop_ids=eos)

    def ft_score():  # noqa: ANN202
        s = ev.score(model, data, batch_size=args.batch_size, max_seq_length=int(data.lengths.max()))
        return s.total().loss

    def masked_loss(model, batch, lengths):  # noqa: ANN001, ANN202
        # mlx_lm.tuner.trainer.default_loss, except that its mask `steps <= length` also scores one target
        # past the end of each sequence (a padding token); `steps < length` scores exactly the reply tokens.
        import mlx.nn as nn

        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
        ce = nn.losses.cross_entropy(logits, targets) * mask
        ntoks = mask.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    def mlx_score():  # noqa: ANN202
        return mlx_evaluate(
            model,
            mlx_items,
            batch_size=args.batch_size,
            num_batches=-1,
            max_seq_length=int(data.lengths.max()) + 1,
            loss=masked_loss,
        )

    def ft_generate():  # noqa: ANN202
        g = ev.generate(model, prompts, opts)
        return g.tokens, sum(map(len, g.tokens))  # reply tokens, the stop token not counted (as for mlx-lm)

    def mlx_generate():  # noqa: ANN202
        outs, total = [], 0
        for p in prompts:
            toks = []
            for r in stream_generate(model, tok, mx.array(p), max_tokens=args.max_tokens):
                if r.token in tok.eos_token_ids:
                    break
                toks.append(int(r.token))
            outs.append(toks)
            total += len(toks)
        return outs, total

    # warm-up (compilation, allocations) on a little of each
    ev.generate(model, prompts[:2], ev.SamplingOptions(max_tokens=4, stop_ids=eos))
    ev.score(model, type(data)([data.tokens(0)], [data.mask(0)]), batch_size=1, max_seq_length=256)
    best = {k: float("inf") for k in ("ft_score", "mlx_score", "ft_gen", "mlx_gen")}
    res: dict[str, object] = {}
    for r in range(args.rounds):
        for key, fn in (
            ("ft_score", ft_score),
            ("mlx_score", mlx_score),
            ("ft_gen", ft_generate),
            ("mlx_gen", mlx_generate),
        ):
            dt, out = _time(fn)
            best[key] = min(best[key], dt)
            res[key] = out
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.1f}s" for k, v in best.items()), flush=True
        )

    ft_loss, mlx_loss = res["ft_score"], res["mlx_score"]
    (ft_toks, ft_n), (mlx_toks, mlx_n) = res["ft_gen"], res["mlx_gen"]  # type: ignore[misc]
    same = sum(a == b for a, b in zip(ft_toks, mlx_toks, strict=True))
    load = os.getloadavg()[0]
    print(
        f"\nmachine: {os.cpu_count()} CPUs, load average {load:.1f}; SmolLM2-135M float32, OpenBLAS preloaded"
    )
    print(f"\n== scoring {n} records ({tokens_in:,} input tokens), batch {args.batch_size} ==")
    print(f"{'':28}{'records/s':>12}{'tokens/s':>12}{'loss':>10}")
    for name, key, loss in (
        ("ft evaluate.score", "ft_score", ft_loss),
        ("mlx_lm trainer.evaluate", "mlx_score", mlx_loss),
    ):
        print(f"{name:28}{n / best[key]:12.1f}{tokens_in / best[key]:12.0f}{loss:10.4f}")
    print(
        f"ratio ft / mlx_lm: {best['mlx_score'] / best['ft_score']:.2f}x records/s; "
        f"losses differ by {abs(ft_loss - mlx_loss):.2e}"
    )
    print(f"\n== greedy generation, {len(prompts)} prompts, at most {args.max_tokens} tokens ==")
    print(f"{'':34}{'generated':>10}{'tok/s':>10}{'wall s':>9}")
    print(
        f"{'ft evaluate.generate (batch ' + str(args.batch_size) + ')':34}{ft_n:10d}{ft_n / best['ft_gen']:10.1f}{best['ft_gen']:9.1f}"
    )
    print(
        f"{'mlx_lm stream_generate (1 by 1)':34}{mlx_n:10d}{mlx_n / best['mlx_gen']:10.1f}{best['mlx_gen']:9.1f}"
    )
    print(
        f"ratio ft / mlx_lm: {(ft_n / best['ft_gen']) / (mlx_n / best['mlx_gen']):.2f}x tokens/s; "
        f"identical replies: {same} of {len(prompts)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
