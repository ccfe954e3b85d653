"""Serving speed: time to first token and generation tokens/s of `ft serve` vs `mlx_lm.server`.

Both servers serve the same model folder (default: the embedded SmolLM2 imported from its GGUF) and
get the same streamed chat requests (greedy, fixed max_tokens), sent round-robin one at a time (never
two generations at once). Reported per server: median time to first token (request sent → first text
chunk) and median generation tokens/s (tokens after the first / time after the first), and the
ratio of `ft serve` to the anchor `mlx_lm.server` measured in the same run.

    python bench/serve.py [--model-dir DIR] [--max-tokens 64] [--repeats 3]

Three servers are measured: `ft serve` as users run it (on CPU a 4-bit model is dequantized to
float32, ft's precision policy), `ft serve --keep-quantized` (weights as stored, like for like with
mlx_lm.server), and `mlx_lm.server` (weights as stored), with the same BLAS preloaded for all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences what a neural network is.",
    "Give me three tips for learning to cook.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} not ready after {timeout}s")


def stream_once(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to first token, generation tokens/s, completion tokens) of one streamed greedy chat."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for c in data.get("choices", []):
                if (c.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
    tokens = usage["completion_tokens"] if usage else chunks
    if first is None or last is None:
        return float("nan"), float("nan"), 0
    gen = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return first - t0, gen, tokens


def summarize(name: str, samples: list[tuple[float, float, int]]) -> dict[str, float]:
    rates = [r for _, r, _ in samples if r == r]
    res = {
        "ttft_s": statistics.median(t for t, _, _ in samples),
        "gen_tps": statistics.median(rates or [0.0]),
        "tokens": statistics.mean(n for _, _, n in samples),
    }
    print(
        f"  {name:28} TTFT {res['ttft_s'] * 1000:7.0f} ms   generation {res['gen_tps']:6.1f} tok/s   "
        f"({res['tokens']:.0f} tokens/answer, {len(samples)} requests)",
        flush=True,
    )
    return res


def run_server(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def prepare_model(work: Path, model_dir: Path | None) -> tuple[Path, Path]:
    """(workspace, model folder): a scratch workspace whose models/ holds the model to serve."""
    from ft.services.project import init_workspace
    from ft.workspace import Workspace

    ws = Workspace(work / "ws")
    init_workspace(ws.root)
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    target = ws.model_dir("bench-model")
    if model_dir is not None:
        target.symlink_to(model_dir.resolve(), target_is_directory=True)
    else:
        from ft.models.embedded import embedded_gguf_path
        from ft.models.gguf_import import import_gguf

        import_gguf(embedded_gguf_path(), target)
    return ws.root, target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, help="mlx-lm model folder (default: the embedded SmolLM2)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from ft.engine.runtime import find_fast_blas

    work = Path(tempfile.mkdtemp(prefix="ft-bench-serve-"))
    try:
        ws, model_dir = prepare_model(work, args.model_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
        blas = find_fast_blas()
        if blas is not None:  # the same optimized BLAS for every server (ft would preload it itself)
            env["LD_PRELOAD"] = ":".join(p for p in (str(blas), env.get("LD_PRELOAD", "")) if p)
        print(
            f"model: {model_dir.resolve() if args.model_dir else 'embedded SmolLM2-135M-Instruct (Q4_1 GGUF)'}"
        )
        print(
            f"BLAS preloaded: {blas or 'none'}; {len(PROMPTS) * args.repeats} streamed greedy chats of up to "
            f"{args.max_tokens} tokens per server\n",
            flush=True,
        )
        results: dict[str, dict[str, float]] = {}
        mlx_lm_server = shutil.which("mlx_lm.server")
        servers = [
            (
                "ft serve",
                [
                    sys.executable,
                    "-m",
                    "ft",
                    "--workspace",
                    str(ws),
                    "serve",
                    "--model",
                    "bench-model",
                    "--port",
                    "{port}",
                ],
                "bench-model",
                "/health",
            ),
            (
                "ft serve --keep-quantized",
                [
                    sys.executable,
                    "-m",
                    "ft",
                    "--workspace",
                    str(ws),
                    "serve",
                    "--model",
                    "bench-model",
                    "--keep-quantized",
                    "--port",
                    "{port}",
                ],
                "bench-model",
                "/health",
            ),
            (
                "mlx_lm.server (anchor)",
                [
                    mlx_lm_server or "mlx_lm.server",
                    "--model",
                    str(model_dir),
                    "--port",
                    "{port}",
                    "--log-level",
                    "WARNING",
                ],
                "default_model",
                "/v1/models",
            ),
        ]
        # All servers run at once (an idle one costs no CPU) and requests go round-robin, so a busy moment
        # of the machine slows every server alike instead of whichever happened to be measured then.
        procs: list[subprocess.Popen] = []
        urls: dict[str, tuple[str, str]] = {}
        try:
            for name, cmd, model, ready in servers:
                port = free_port()
                log = work / (re.sub(r"\W+", "_", name) + ".log")
                procs.append(run_server([c.replace("{port}", str(port)) for c in cmd], env, log))
                urls[name] = (f"http://127.0.0.1:{port}", model)
                wait_ready(urls[name][0], procs[-1], ready)
            for url, model in urls.values():
                stream_once(url, model, "Hello!", 8)  # warm-up: first-call allocations, thread start-up
            samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in urls}
            order = list(urls)
            for rep in range(args.repeats):
                for i, p in enumerate(PROMPTS):
                    order = order[1:] + order[:1]  # rotate who goes first
                    for name in order:
                        url, model = urls[name]
                        # A different prompt each time, so no server answers from a prompt cache.
                        samples[name].append(
                            stream_once(url, model, f"{p} (request {rep}.{i})", args.max_tokens)
                        )
            for name in urls:
                results[name] = summarize(name, samples[name])
        finally:
            for proc in procs:
                stop(proc)
        anchor = results["mlx_lm.server (anchor)"]
        print("\nratio to mlx_lm.server (same run): TTFT lower is better, tok/s higher is better")
        for name in ("ft serve", "ft serve --keep-quantized"):
            r = results[name]
            print(
                f"  {name:28} TTFT x{r['ttft_s'] / anchor['ttft_s']:.2f}   generation tok/s x{r['gen_tps'] / anchor['gen_tps']:.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
