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
