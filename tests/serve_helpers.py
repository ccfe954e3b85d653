"""Helpers for the serving tests: a workspace holding the embedded model (and a tuned run), and a real
`ft serve` subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

BASE = "smollm2-135m-instruct"
RUN_ID = "20250101-000000-tuned"
RUN_NAME = "tuned"
CHECKPOINT = "step-000002"


def make_workspace(root: Path, smollm2_dir: Path, passwords: dict[str, str] | None = None) -> Path:
    """A workspace with the embedded model registered under models/ (a symlink to the shared import)."""
    from ft.services.project import init_workspace
    from ft.workspace import Workspace

    init_workspace(root)
    ws = Workspace(root)
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    ws.model_dir(BASE).symlink_to(Path(smollm2_dir).resolve(), target_is_directory=True)
    ws.registry().upsert(
        "models", {"name": BASE}, source="embedded:smollm2", meta={"path": str(ws.model_dir(BASE))}
    )
    if passwords:
        ws.passwords_yml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in passwords.items()))
        ws.passwords_yml.chmod(0o600)
    return root


def add_tuned_run(root: Path, seed: int = 0):
    """A run whose best checkpoint holds random (non-zero) LoRA weights on q/v; returns the adapted model.

    The checkpoint is written by ft's engine (ft.engine.checkpoint, as `ft train` writes them), and the
    returned in-memory model is the reference for its output.
    """
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from ft.engine.checkpoint import save_checkpoint
    from ft.engine.lora import AdapterSpec, apply_adapters
    from ft.models.loading import load_model_dir
    from ft.workspace import Workspace
    from ft.workspace.run_folder import BEST, CHECKPOINTS, set_pointer

    ws = Workspace(root)
    loaded = load_model_dir(ws.model_dir(BASE))
    spec = AdapterSpec(method="lora", rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    mx.random.seed(seed)  # lora_a is initialised randomly too: seed first, so the run is the same every time
    apply_adapters(loaded.model, spec)
    updates = [
        (k, mx.random.normal(v.shape) * 0.3)
        for k, v in tree_flatten(loaded.model.trainable_parameters())
        if k.endswith("lora_b")
    ]
    loaded.model.load_weights(updates, strict=False)
    loaded.model.eval()
    # Written by the engine's own checkpoint code, as `ft train` does.
    folder = ws.run_dir(RUN_ID) / CHECKPOINTS
    ckpt = save_checkpoint(
        folder,
        int(CHECKPOINT.split("-")[1]),
        loaded.model,
        optim.Adam(learning_rate=1e-3),
        {"step": 2},
        {**spec.to_json(), "base_model": BASE},
        {},
    )
    set_pointer(folder, BEST, ckpt.name)
    ws.registry().upsert("runs", {"id": RUN_ID}, name=RUN_NAME, status="completed", meta={"model": BASE})
    return loaded.model, loaded.tokenizer


TOOL_RUN = "run-tools"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_RESULT = "18 C and sunny"
TOOL_ANSWER = "It is 18 C and sunny in Paris."


def tool_history(call_id: str, arguments: str = '{"city": "Paris"}') -> list[dict]:
    """The question, the assistant's call (OpenAI form) and the tool's result."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        *TOOL_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]


def add_tool_run(root: Path, steps: int = 30) -> float:
    """Run TOOL_RUN: LoRA trained (a few dozen Adam steps) to call get_weather for TOOL_QUESTION and to
    answer TOOL_ANSWER once the result is in, on prompts rendered by the server's own tool renderer
    (ft's fallback: the embedded SmolLM2's template has no tool support)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from ft.data.templates import fallback_call_text
    from ft.engine.checkpoint import save_checkpoint
    from ft.engine.lora import AdapterSpec, apply_adapters
    from ft.models.loading import load_model_dir
    from ft.services.serving import tool_support
    from ft.workspace import Workspace
    from ft.workspace.run_folder import BEST, CHECKPOINTS, set_pointer

    ws = Workspace(root)
    loaded = load_model_dir(ws.model_dir(BASE), dequantize=True, dtype="float32")
    tok = loaded.tokenizer
    render = tool_support(tok, BASE).render
    end = tok.encode("<|im_end|>", add_special_tokens=False)
    pairs = [
        (render(TOOL_QUESTION, [WEATHER_TOOL]), fallback_call_text("get_weather", {"city": "Paris"})),
        (render(tool_history("call_1"), [WEATHER_TOOL]), TOOL_ANSWER),
    ]
    seqs = [(mx.array([p + tok.encode(a, add_special_tokens=False) + end]), len(p)) for p, a in pairs]
    mx.random.seed(0)
    spec = AdapterSpec(
        method="lora",
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
    )
    model = loaded.model
    apply_adapters(model, spec)

    def loss_fn(m):
        total = 0.0
        for seq, n_prompt in seqs:
            ce = nn.losses.cross_entropy(m(seq[:, :-1]), seq[:, 1:])[:, n_prompt - 1 :]
            total = total + ce.mean()
        return total

    opt = optim.Adam(learning_rate=1e-3)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
    folder = ws.run_dir(TOOL_RUN) / CHECKPOINTS
    ckpt = save_checkpoint(
        folder, steps, model, opt, {"step": steps}, {**spec.to_json(), "base_model": BASE}, {}
    )
    set_pointer(folder, BEST, ckpt.name)
    ws.registry().upsert("runs", {"id": TOOL_RUN}, name="tools", status="completed", meta={"model": BASE})
    return float(loss.item())


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    out: Path
    err: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # Ctrl-C: uvicorn shuts down gracefully
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def ft_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    env.update(extra)
    return env


def start_server(ws: Path, tmp: Path, *args: str, wait_ready: bool = True, timeout: float = 180) -> Server:
    """`ft --workspace WS serve --port 0 ARGS` in a subprocess; waits until /health says ok."""
    out, err = tmp / "serve.out", tmp / "serve.err"
    cmd = [sys.executable, "-m", "ft", "--workspace", str(ws), "serve", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=out.open("w"), stderr=err.open("w"), env=ft_env(), cwd=ws)
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        m = re.search(r"listening on (http://\S+)", out.read_text(errors="replace"))
        if m:
            url = m.group(1)
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(
                f"ft serve did not start (exit {proc.poll()}):\n{out.read_text()}\n{err.read_text()}"
            )
        time.sleep(0.1)
    server = Server(proc, url, out, err)
    if wait_ready:
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise AssertionError(f"ft serve never became healthy:\n{server.log()}")
            time.sleep(0.2)
    return server
