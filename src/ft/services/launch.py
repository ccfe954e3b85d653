"""Start a data-parallel run: N local ranks (`ft train --nproc N`) or ranks on several hosts (`--hostfile`).

On one host ft starts the ranks itself, with the environment MLX's own launcher (``mlx.launch``) gives
them: the ring backend's hostfile (``MLX_HOSTFILE``: a JSON list with one ``["ip:port"]`` per rank) or
NCCL's rendezvous (``NCCL_HOST_IP``/``NCCL_PORT``, one GPU per rank), plus ``MLX_RANK`` and
``MLX_WORLD_SIZE``. Doing it here rather than through ``mlx.launch`` gives the run an exit code (rank 0's,
or the first failing rank's) and stops the other ranks when one fails. Several hosts go through
``mlx.launch --hostfile`` (it reaches them over ssh); `mlx.launch -n 2 -- ft train ...` also works as is.

Rank 0 prints and writes everything; the other ranks' output is kept in a log file per rank
(``<workspace>/runs/.ranks/rank-K.log``) and its tail is printed when that rank fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ft.errors import ErrorCode, FtError

RANK_LOGS = ".ranks"
_GRACE_SECONDS = 15.0  # after one rank fails, the others get this long to notice and exit on their own


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def pick_backend(backend: str, nproc: int) -> str:
    """``auto``: NCCL where MLX runs on CUDA with a GPU per rank, else the ring backend (CPU, Macs)."""
    if backend != "auto":
        return backend
    try:
        import mlx.core as mx

        if mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available():
            return "nccl"
    except (ImportError, AttributeError, RuntimeError):
        pass
    return "ring"


def rank_env(
    rank: int, size: int, backend: str, hostfile: Path | None, nccl_port: int | None
) -> dict[str, str]:
    env = {"MLX_RANK": str(rank), "MLX_WORLD_SIZE": str(size)}
    if backend == "ring":
        assert hostfile is not None
        env["MLX_HOSTFILE"] = str(hostfile)
    elif backend == "nccl":
        env.update(
            {"NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(nccl_port), "CUDA_VISIBLE_DEVICES": str(rank)}
        )
    return env


def launch_local(
    cmd: Sequence[str],
    nproc: int,
    backend: str = "auto",
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run ``cmd`` as ``nproc`` ranks on this host; the exit code is rank 0's, or the first failing rank's."""
    if nproc < 2:
        raise FtError(
            ErrorCode.USAGE, f"--nproc {nproc}: data parallelism needs at least 2 processes", "drop --nproc"
        )
    backend = pick_backend(backend, nproc)
    if backend not in ("ring", "nccl"):
        raise FtError(
            ErrorCode.USAGE,
            f"distributed.backend {backend} cannot be started by ft on one host",
            "use ring (CPU, Macs) or nccl (NVIDIA GPUs), or start the ranks with mlx.launch / mpirun yourself",
        )
    tmp = Path(tempfile.mkdtemp(prefix="ft-ranks-"))
    hostfile = None
    nccl_port = None
    if backend == "ring":
        hostfile = tmp / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(nproc)]))
    else:
        nccl_port = _free_ports(1)[0]
    logs = Path(log_dir) if log_dir is not None else tmp
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for rank in range(nproc):
            child_env = {**os.environ, **(env or {}), **rank_env(rank, nproc, backend, hostfile, nccl_port)}
            if rank == 0:
                procs.append(subprocess.Popen(list(cmd), env=child_env))
            else:
                fh = (logs / f"rank-{rank}.log").open("w")
                files.append(fh)
                procs.append(subprocess.Popen(list(cmd), env=child_env, stdout=fh, stderr=subprocess.STDOUT))
        return _wait(procs, logs)
    except KeyboardInterrupt:
        # Ctrl-C reached every rank (one process group): they stop together after the step in flight.
        return _wait(procs, logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for fh in files:
            fh.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(procs: list[subprocess.Popen], logs: Path) -> int:
    failed_at: float | None = None
    first_bad: int | None = None
    while True:
        codes = [p.poll() for p in procs]
        for rank, c in enumerate(codes):
            if c not in (None, 0) and first_bad is None:
                first_bad, failed_at = rank, time.monotonic()
        if all(c is not None for c in codes):
            break
        if failed_at is not None and time.monotonic() - failed_at > _GRACE_SECONDS:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            time.sleep(2)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:
            continue
    codes = [p.wait() for p in procs]
    for rank, c in enumerate(codes):
        if rank and c != 0:
            tail = _tail(logs / f"rank-{rank}.log")
            print(
                f"rank {rank} exited with code {c}" + (f"; its last lines:\n{tail}" if tail else ""),
                file=sys.stderr,
            )
    done = [c or 0 for c in codes]  # every process has exited here
    if done[0] != 0:
        return done[0]
    return next((c for c in done if c != 0), 0) if first_bad is None else done[first_bad] or 1


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("  " + line for line in text[-lines:])


def launch_hosts(cmd: Sequence[str], hostfile: Path, backend: str = "auto") -> int:
    """Several hosts: MLX's own launcher (ssh to each host of ``hostfile``, mlx.launch's JSON format)."""
    if not Path(hostfile).is_file():
        raise FtError(
            ErrorCode.NOT_FOUND, f"hostfile {hostfile} does not exist", "write it as mlx.launch documents"
        )
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    args = [launcher, "--hostfile", str(hostfile)]
    if backend != "auto":
        args += ["--backend", backend]
    return subprocess.call([*args, "--", *cmd])


def strip_launch_options(argv: Sequence[str]) -> list[str]:
    """The command line for each rank: the user's, less --nproc/--hostfile (a rank never launches again)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--hostfile"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--hostfile=")):
            continue
        out.append(a)
    return out


def maybe_launch(
    ws_root: Path,
    argv: Sequence[str],
    nproc: int | None,
    hostfile: Path | None,
    overrides: Sequence[str],
    config_path: Path | None,
) -> int | None:
    """`ft train` in a process of its own: start the ranks when --nproc/--hostfile or train.yml's
    ``distributed`` section asks for several; returns their exit code, or None to train here."""
    if os.environ.get("MLX_RANK") is not None:
        return None  # already one of the ranks
    from ft.config.loader import load_config
    from ft.services.parallel import BACKEND_ENV

    cfg = load_config(config_path if config_path is not None else ws_root, list(overrides)).config.distributed
    nproc = nproc if nproc is not None else cfg.nproc
    hostfile = hostfile if hostfile is not None else (Path(cfg.hostfile) if cfg.hostfile else None)
    if hostfile is None and nproc <= 1:
        return None
    cmd = [sys.executable, "-m", "ft", *strip_launch_options(argv)]
    if hostfile is not None:
        path = hostfile if hostfile.is_absolute() else ws_root / hostfile
        return launch_hosts(cmd, path, cfg.backend)
    backend = pick_backend(cfg.backend, nproc)
    return launch_local(cmd, nproc, backend, log_dir=ws_root / "runs" / RANK_LOGS, env={BACKEND_ENV: backend})
