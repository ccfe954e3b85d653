"""One rank of the data-parallel engine test (run alone, or as a rank of ft.services.launch.launch_local).

Trains the tiny LoRA Llama for a few steps and (rank 0, or a lone process) writes the step losses,
validation losses and final adapter weights to OUT (an .npz); every rank writes its own weights too,
so the test can check that the ranks hold the same weights.
usage: dist_worker.py OUT PACKING(on|off) [OBJECTIVE(sft|kto|dpo)]
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from engine_helpers import random_examples, tiny_llama  # noqa: E402
from ft.engine import distributed  # noqa: E402
from ft.engine.batching import BatchOptions  # noqa: E402
from ft.engine.lora import AdapterSpec, apply_adapters  # noqa: E402
from ft.engine.optim import OptimizerSpec, build_optimizer  # noqa: E402
from ft.engine.trainer import TrainOptions, train  # noqa: E402


class Recorder:
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.val: list[float] = []

    def on_step(self, e) -> None:
        self.losses.append(e.loss)

    def on_eval(self, e) -> None:
        self.val.append(e.val_loss)


def _data(objective: str, n: int, seed: int):
    """SFT examples; KTO: the same replies labelled; DPO: consecutive replies as (chosen, rejected)."""
    from ft.engine.preference import PreferenceData, consecutive_pairs

    ex = random_examples(n, seed=seed)
    if objective == "sft":
        return ex
    labels = (np.random.default_rng(seed).random(n) < 0.7).astype(np.int8)
    if objective == "kto":
        return PreferenceData(ex, labels)
    labels[0::2], labels[1::2] = 1, 0
    return PreferenceData(ex, labels, consecutive_pairs(n))


def main() -> None:
    out, packing = sys.argv[1], sys.argv[2] == "on"
    objective = sys.argv[3] if len(sys.argv) > 3 else "sft"
    dp = distributed.init("ring")
    model = tiny_llama(seed=0)
    apply_adapters(model, AdapterSpec(rank=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    mx.eval(model.parameters())
    initial = {f"init:{k}": np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    opt = build_optimizer(OptimizerSpec(name="adamw"), 1e-3)
    opts = TrainOptions(
        BatchOptions(
            batch_size=2,
            grad_accumulation_steps=2,
            max_seq_length=64,
            packing=None if packing else False,
            seed=3,
        ),
        total_steps=10,
        eval_steps=5,
        max_grad_norm=1.0,
        log_steps=1,
        parallel=dp,
    )
    rec = Recorder()
    kw = {}
    if objective != "sft":
        from ft.engine.objectives import PreferenceOptions

        kw = {"objective": PreferenceOptions(objective, beta=0.3)}
    train(model, opt, _data(objective, 40, 1), _data(objective, 10, 2), opts, callbacks=[rec], **kw)
    weights = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    rank = dp.rank if dp is not None else 0
    np.savez(
        f"{out}.rank{rank}.npz", losses=np.array(rec.losses), val=np.array(rec.val), **weights, **initial
    )


if __name__ == "__main__":
    main()
