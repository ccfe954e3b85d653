"""`make demo`: the whole user workflow on the embedded model, as a user would type it.

Each step is a real `ft` command in a subprocess, in a scratch workspace (demo/workspace).
A failing step stops the demo with that step's exit code.

`python -m ft.demo tools` is the tool-calling workflow instead (demo/tools-workspace): the generated
note-vault sample of `ft init --profile tools`, a short LoRA run, and `ft evaluate` showing the
tool-call metrics of the base and the tuned model (docs/tools.md has the numbers it gave).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_DIR = Path(os.environ.get("FT_DEMO_DIR", "demo")).resolve()
WS = DEMO_DIR / "workspace"
TOOLS_WS = DEMO_DIR / "tools-workspace"

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

Step = tuple[str, list[str]]
PULL: Step = ("Pull the embedded model", ["models", "pull", "smollm2-135m-instruct"])


def _prepare(title: str, name: str) -> Step:
    return title, ["dataset", "prepare", "data/sample.jsonl", "--name", name]


def _train(title: str, dataset: str, run: str, settings: list[str]) -> Step:
    return title, ["train", "--dataset", dataset, "--name", run, *[a for s in settings for a in ("--set", s)]]


STEPS: list[Step] = [
    ("Create a workspace", ["init", str(WS)]),
    PULL,
    _prepare("Prepare the sample data", "sample"),
    _train("Train a short LoRA run", "sample", "demo", TRAIN_SETTINGS),
    (
        "Evaluate the best checkpoint against the base",
        ["evaluate", "--checkpoint", "best", "--n-samples", "3"],
    ),
    ("Export to GGUF for llama.cpp / Ollama", ["export", "--format", "gguf", "--quant", "f16"]),
]


# The tool-calling run: short enough for two CPU cores (~550-token examples), long enough for the 135M
# model to learn the call format and the tool choice (docs/tools.md has the numbers it gave).
TOOLS_TRAIN_SETTINGS = [
    "training.max_steps=12",
    "training.warmup_steps=2",
    "training.batch_size=2",
    "training.grad_accumulation_steps=1",
    "training.learning_rate=1.5e-3",
    "training.eval_steps=100",
    "training.save_steps=12",
    "training.eval_batches=1",
    "logging.steps=2",
]

TOOLS_STEPS: list[Step] = [
    ("Create a workspace with the tool-use sample", ["init", str(TOOLS_WS), "--profile", "tools"]),
    PULL,
    _prepare("Prepare the tool-calling data", "tools"),
    _train("Train a short LoRA run on the tool calls", "tools", "tools-demo", TOOLS_TRAIN_SETTINGS),
    (
        "Tool-call metrics: base vs tuned",
        [
            "evaluate",
            "--checkpoint",
            "latest",
            "--n-samples",
            "0",
            "--max-tokens",
            "64",
            "--tool-cases",
            "24",
            "--limit",
            "8",
            "--batch-size",
            "8",
            "--group-by",
            "category",
        ],
    ),
]


def _banner(i: int, n: int, title: str, argv: list[str]) -> None:
    print(f"\n\033[1m[{i}/{n}] {title}\033[0m\n$ ft {' '.join(argv)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["tools"]):
        print("usage: python -m ft.demo [tools]", file=sys.stderr)
        return 2
    steps, ws = (TOOLS_STEPS, TOOLS_WS) if args == ["tools"] else (STEPS, WS)
    if ws.exists():
        # The demo owns this scratch folder; a previous demo's results are replaced, nothing else is touched.
        print(f"removing the previous demo workspace {ws}")
        shutil.rmtree(ws)
    env = {**os.environ, "FT_WORKSPACE": str(ws)}
    env.pop("FT_DEBUG", None)
    results: list[tuple[str, str, float]] = []
    for i, (title, argv) in enumerate(steps, 1):
        _banner(i, len(steps), title, argv)
        t0 = time.perf_counter()
        cwd = ws if ws.exists() else DEMO_DIR.parent
        code = subprocess.call(
            [sys.executable, "-m", "ft", *argv], env=env if i > 1 else {**env, "FT_WORKSPACE": ""}, cwd=cwd
        )
        dt = time.perf_counter() - t0
        if code != 0:
            print(f"\n\033[31mdemo failed at step {i} ({title}), exit code {code}\033[0m")
            results.append((title, f"FAILED ({code})", dt))
            _summary(results, ws)
            return code
        results.append((title, "done", dt))
    _summary(results, ws)
    return 0


def _summary(results: list[tuple[str, str, float]], ws: Path) -> None:
    print("\n\033[1mDemo summary\033[0m")
    for title, status, dt in results:
        print(f"  {status:>14}  {dt:6.1f}s  {title}")
    print(f"\nEverything is in {ws}:")
    for sub, what in (
        ("models", "imported base models"),
        ("datasets", "prepared datasets"),
        ("runs", "training runs"),
    ):
        p = ws / sub
        if p.is_dir():
            items = sorted(x.name for x in p.iterdir() if not x.name.startswith("."))
            print(f"  {sub + '/':10} {what}: {', '.join(items) if items else '(none)'}")
    ggufs = sorted(ws.glob("runs/*/export/**/*.gguf"))
    if ggufs:
        print(f"\nChat with the tuned model in llama.cpp:\n  llama-cli -m {ggufs[-1]} -cnv")
    print(f"Serve it over an OpenAI-compatible API:\n  ft --workspace {ws} serve --port 8000")


if __name__ == "__main__":
    sys.exit(main())
