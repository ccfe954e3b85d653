"""Serving speed: time to first token and generation tokens/s of `ft serve` vs `mlx_lm.server`.

Both servers serve the same model folder (default: the embedded SmolLM2 imported from its GGUF) and
get the same streamed chat requests (greedy, fixed max_tokens), sent round-robin one at a time (never
two generations at once). Reported per server: median time to first token (request sent → first text
chunk) and median generation tokens/s (tokens after the first / time after the first), and the
ratio of `ft serve` to the anchor `mlx_lm.server` measured in the same run.

    python bench/serve.py [--model-dir DIR] [--max-tokens 64] [--repeats 3]
    python bench/serve.py --clients 16 [--per-client 3] [--max-tokens 32]     # concurrent clients

With ``--clients N`` the servers are measured under load instead: N client threads each send
``--per-client`` non-streamed greedy chats (all prompts different) to one server at a time, then the same
number of chats is sent one at a time; reported per server: aggregate generation tokens/s (completion
tokens of all answers / wall time), p50/p90 request latency, errors; then bad requests (malformed JSON,
wrong fields) counted by status class, where any 5xx is a failure.

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


def chat_once(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """(seconds, completion tokens, HTTP status) of one non-streamed greedy chat."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    try:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
    except httpx.HTTPError:
        return time.perf_counter() - t0, 0, 0
    dt = time.perf_counter() - t0
    tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
    return dt, tokens, r.status_code


def load_phase(url: str, model: str, clients: int, per_client: int, max_tokens: int, tag: str) -> dict:
    """``clients`` threads × ``per_client`` chats at once (clients == 1: one at a time)."""
    import threading

    results: list[tuple[float, int, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for j in range(per_client):
            p = PROMPTS[(c + j) % len(PROMPTS)]
            res = chat_once(url, model, f"{p} (client {c}, request {j}, {tag})", max_tokens)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[2] == 200]
    lat = sorted(r[0] for r in ok) or [float("nan")]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "tokens": sum(r[1] for r in ok),
        "wall_s": wall,
        "tok_s": sum(r[1] for r in ok) / wall,
        "p50_s": lat[len(lat) // 2],
        "p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))],
    }


BAD_BODIES = [
    b"{",
    b"null",
    b"[]",
    b'{"messages": "hi"}',
    b'{"messages": [{"role": "robot", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
    b'{"messages": [{"role": "user", "content": "x"}], "n": 3}',
    b'{"messages": [{"role": "user", "content": "x"}], "model": "../../etc/passwd"}',
    b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 5}}',
    b'{"messages": [{"role": "user", "content": "x"}], "stop": [""]}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b"[" * 100_000 + b"]" * 100_000,
]


def bad_requests(url: str, model: str, n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(n):
        body = BAD_BODIES[i % len(BAD_BODIES)]
        try:
            r = httpx.post(
                url + "/v1/chat/completions",
                content=body.replace(b'"messages"', f'"model": "{model}", "messages"'.encode(), 1),
                headers={"content-type": "application/json"},
                timeout=60,
            )
            key = f"{r.status_code // 100}xx"
        except httpx.HTTPError:
            key = "no answer"
        counts[key] = counts.get(key, 0) + 1
    return counts


def concurrent_bench(
    args: argparse.Namespace, ws: Path, model_dir: Path, env: dict[str, str], work: Path
) -> None:
    servers = [
        (
            "ft serve",
            [sys.executable, "-m", "ft", "--workspace", str(ws), "serve", "--model", "bench-model"]
            + ["--max-batch", str(max(args.clients, 1)), "--max-client-requests", str(4 * args.clients)]
            + ["--port", "{port}"],
            "bench-model",
            "/health",
        ),
        *(
            [
                (
                    "ft --keep-quantized",
                    [sys.executable, "-m", "ft", "--workspace", str(ws), "serve", "--model", "bench-model"]
                    + ["--keep-quantized", "--max-batch", str(max(args.clients, 1))]
                    + ["--max-client-requests", str(4 * args.clients), "--port", "{port}"],
                    "bench-model",
                    "/health",
                )
            ]
            if args.like_for_like
            else []
        ),
        (
            "mlx_lm.server",
            [shutil.which("mlx_lm.server") or "mlx_lm.server", "--model", str(model_dir)]
            + [
                "--decode-concurrency",
                str(max(args.clients, 1)),
                "--port",
                "{port}",
                "--log-level",
                "WARNING",
            ],
            "default_model",
            "/v1/models",
        ),
    ]
    n = args.clients * args.per_client
    print(
        f"{args.clients} concurrent clients x {args.per_client} non-streamed greedy chats (up to {args.max_tokens} "
        f"tokens), then {args.sequential} chats one at a time, per server (one server running at a time)\n",
        flush=True,
    )
    rows = {}
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    for name, cmd, model, ready in servers:
        if name in skip:
            continue
        port = free_port()
        log = work / (re.sub(r"\W+", "_", name) + ".log")
        proc = run_server([c.replace("{port}", str(port)) for c in cmd], env, log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, ready)
            chat_once(url, model, "Hello!", 8)  # warm-up
            conc = load_phase(url, model, args.clients, args.per_client, args.max_tokens, "c")
            seq = load_phase(url, model, 1, args.sequential, args.max_tokens, "s")
            bad = bad_requests(url, model, args.bad) if name == "ft serve" else {}
            healthy = httpx.get(url + ready, timeout=30).status_code == 200
        finally:
            stop(proc)
        rows[name] = (conc, seq, bad, healthy)
        print(
            f"  {name:20} {args.clients} clients: {conc['tok_s']:6.1f} tok/s aggregate, latency p50 "
            f"{conc['p50_s']:5.1f}s p90 {conc['p90_s']:5.1f}s, {conc['errors']} errors of {conc['requests']}"
            f" ({conc['tokens']} tokens in {conc['wall_s']:.0f}s)\n"
            f"  {'':20} one at a time: {seq['tok_s']:6.1f} tok/s, latency p50 {seq['p50_s']:5.1f}s "
            f"p90 {seq['p90_s']:5.1f}s, {seq['errors']} errors of {seq['requests']}\n"
            f"  {'':20} concurrent / one at a time: x{conc['tok_s'] / seq['tok_s']:.2f}",
            flush=True,
        )
        if bad:
            print(f"  {'':20} {args.bad} bad requests: {bad}; healthy after: {healthy}", flush=True)
    assert all(r[0]["requests"] == n for r in rows.values())
    if "mlx_lm.server" in rows:
        ml = rows["mlx_lm.server"][0]
        for name in rows:
            if name != "mlx_lm.server":
                ratio = rows[name][0]["tok_s"] / ml["tok_s"]
                print(f"\n{name} / mlx_lm.server with {args.clients} clients (same run): tok/s x{ratio:.2f}")


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
    ap.add_argument(
        "--clients", type=int, default=0, help="concurrent clients (0: the one-at-a-time TTFT bench)"
    )
    ap.add_argument("--per-client", type=int, default=3, help="chats per concurrent client")
    ap.add_argument("--sequential", type=int, default=8, help="chats sent one at a time for the baseline")
    ap.add_argument(
        "--bad", type=int, default=200, help="malformed requests sent to ft serve (--clients mode)"
    )
    ap.add_argument(
        "--like-for-like",
        action="store_true",
        help="--clients mode: also ft serve --keep-quantized (the 4-bit weights as mlx_lm.server serves them)",
    )
    ap.add_argument("--skip", default="", help="--clients mode: comma-separated server names to leave out")
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
        if args.clients:
            concurrent_bench(args, ws, model_dir, env, work)
            return 0
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
