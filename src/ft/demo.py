"""`make demo`: the whole user workflow on the embedded model, as a user would type it.

Each step is a real `ft` command in a subprocess, in a scratch workspace (demo/workspace).
A step whose command is not built yet (exit code 12) says so and the demo goes on; any other
failure stops the demo with that step's exit code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

NOT_BUILT_EXIT = 12
DEMO_DIR = Path(os.environ.get("FT_DEMO_DIR", "demo")).resolve()
WS = DEMO_DIR / "workspace"

# A short run that still shows learning on CI's 2 cores: a few minutes, not hours.
TRAIN_SETTINGS = [
    "training.max_steps=40",
    "training.warmup_steps=4",
    "training.eval_steps=10",
    "training.save_steps=10",
    "training.batch_size=4",
    "training.grad_accumulation_steps=2",
    "training.learning_rate=5e-4",
    "logging.steps=5",
    "data.max_seq_length=512",
]

STEPS: list[tuple[str, list[str]]] = [
    ("Create a workspace", ["init", str(WS)]),
    ("Pull the embedded model", ["models", "pull", "smollm2-135m-instruct"]),
    ("Prepare the sample data", ["dataset", "prepare", "data/sample.jsonl", "--name", "sample"]),
    (
        "Train a short LoRA run",
        [
            "train",
            "--dataset",
            "sample",
            "--name",
            "demo",
            *[a for s in TRAIN_SETTINGS for a in ("--set", s)],
        ],
    ),
    (
        "Evaluate the best checkpoint against the base",
        ["evaluate", "--checkpoint", "best", "--n-samples", "3"],
    ),
    ("Export to GGUF for llama.cpp / Ollama", ["export", "--format", "gguf", "--quant", "f16"]),
]


def _banner(i: int, title: str, argv: list[str]) -> None:
    print(f"\n\033[1m[{i}/{len(STEPS)}] {title}\033[0m\n$ ft {' '.join(argv)}", flush=True)


def main() -> int:
    if WS.exists():
        # The demo owns this scratch folder; a previous demo's results are replaced, nothing else is touched.
        print(f"removing the previous demo workspace {WS}")
        shutil.rmtree(WS)
    env = {**os.environ, "FT_WORKSPACE": str(WS)}
    env.pop("FT_DEBUG", None)
    results: list[tuple[str, str, float]] = []
    for i, (title, argv) in enumerate(STEPS, 1):
        _banner(i, title, argv)
        t0 = time.perf_counter()
        cwd = WS if WS.exists() else DEMO_DIR.parent
        code = subprocess.call(
            [sys.executable, "-m", "ft", *argv], env=env if i > 1 else {**env, "FT_WORKSPACE": ""}, cwd=cwd
        )
        dt = time.perf_counter() - t0
        if code == NOT_BUILT_EXIT:
            print(f"-> not built yet (`ft {argv[0]}`): skipped")
            results.append((title, "not built yet", dt))
            continue
        if code != 0:
            print(f"\n\033[31mdemo failed at step {i} ({title}), exit code {code}\033[0m")
            results.append((title, f"FAILED ({code})", dt))
            _summary(results)
            return code
        results.append((title, "done", dt))
    _summary(results)
    return 0


def _summary(results: list[tuple[str, str, float]]) -> None:
    print("\n\033[1mDemo summary\033[0m")
    for title, status, dt in results:
        print(f"  {status:>14}  {dt:6.1f}s  {title}")
    print(f"\nEverything is in {WS}:")
    for sub, what in (
        ("models", "imported base models"),
        ("datasets", "prepared datasets"),
        ("runs", "training runs"),
    ):
        p = WS / sub
        if p.is_dir():
            items = sorted(x.name for x in p.iterdir() if not x.name.startswith("."))
            print(f"  {sub + '/':10} {what}: {', '.join(items) if items else '(none)'}")
    ggufs = sorted(WS.glob("runs/*/export/**/*.gguf"))
    if ggufs:
        print(f"\nChat with the tuned model in llama.cpp:\n  llama-cli -m {ggufs[-1]} -cnv")
    print(f"Serve it over an OpenAI-compatible API:\n  ft --workspace {WS} serve --port 8000")


if __name__ == "__main__":
    sys.exit(main())
