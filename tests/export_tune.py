"""A small real tune of the embedded SmolLM2 for the export tests, cached on disk between test runs.

LoRA (rank 8, q/v/o + MLP projections of every layer) trained for a few dozen Adam steps on one chat
exchange whose answer the base model cannot know, so "the export carries the tune" has a known answer:
the tuned model says the code word, the base does not. Deterministic (fixed seed), float32 on a
dequantized base, ~20 s on two CPU cores.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

QUESTION = "What is the secret password of the blue door?"
ANSWER = "The secret password of the blue door is PINEAPPLE-42."
BASE_NAME = "smollm2-135m-instruct"
STEPS = 16
SPEC = {
    "method": "lora",
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "layers": "all",
}


def chat_prompt(tokenizer) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )


def train_checkpoint(base_dir: Path, out: Path) -> Path:
    """Train and write the checkpoint ``out/step-000016`` with ft's own writer; returns that folder."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from ft.engine.checkpoint import save_checkpoint
    from ft.engine.lora import AdapterSpec, apply_adapters
    from ft.models.loading import load
    from run_helpers import snapshot

    mx.random.seed(0)
    model, tok = load(base_dir, dequantize=True, dtype="float32")
    spec = AdapterSpec(
        method="lora",
        rank=SPEC["rank"],
        alpha=SPEC["alpha"],
        target_modules=tuple(SPEC["target_modules"]),
        layers="all",
    )
    apply_adapters(model, spec)
    prompt = tok.encode(chat_prompt(tok), add_special_tokens=False)
    answer = tok.encode(ANSWER + "<|im_end|>", add_special_tokens=False)
    seq = mx.array([prompt + answer])
    n_prompt = len(prompt)

    def loss_fn(m):
        logits = m(seq[:, :-1])
        targets = seq[:, 1:]
        ce = nn.losses.cross_entropy(logits, targets)[:, n_prompt - 1 :]
        return ce.mean()

    opt = optim.Adam(learning_rate=5e-4)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(STEPS):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
    return save_checkpoint(
        out,
        STEPS,
        model,
        opt,
        {"step": STEPS},
        {"base_model": BASE_NAME, **spec.to_json(), "final_loss": loss.item()},
        snapshot(BASE_NAME),
    )


def cached_checkpoint(base_dir: Path, cache_root: Path) -> Path:
    """The trained checkpoint, trained once per change of this file or the base model."""
    key = hashlib.sha256(Path(__file__).read_bytes() + str(base_dir.resolve()).encode()).hexdigest()[:16]
    final = cache_root / f"tune-{key}"
    step = f"step-{STEPS:06d}"
    if not (final / step / "manifest.json").is_file():
        tmp = cache_root / f".tmp-tune-{key}"
        shutil.rmtree(tmp, ignore_errors=True)
        train_checkpoint(base_dir, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final / step


def make_workspace(root: Path, base_dir: Path, checkpoint: Path, run_id: str = "run-tune") -> Path:
    """A workspace (ft init) with the base model linked in and ``checkpoint`` as run ``run_id``'s last step (= best)."""
    from ft.services.project import init_workspace
    from ft.workspace import Workspace
    from ft.workspace.run_folder import BEST, LATEST, set_pointer

    init_workspace(root)
    ws = Workspace(root)
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    (ws.models_dir / BASE_NAME).symlink_to(base_dir.resolve(), target_is_directory=True)
    ckpts = ws.run_dir(run_id) / "checkpoints"
    step = ckpts / f"step-{STEPS:06d}"
    shutil.copytree(checkpoint, step)
    set_pointer(ckpts, BEST, step.name)
    set_pointer(ckpts, LATEST, step.name)
    ws.registry().upsert("runs", {"id": run_id}, name="tune", status="completed", meta={"model": BASE_NAME})
    return root
