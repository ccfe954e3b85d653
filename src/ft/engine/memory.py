"""Memory watching: process RSS (psutil), MLX active/peak memory, and a warning before it runs out."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx

try:  # psutil is a dependency of ft; the bare GPU benchmark host may lack it
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

from ft.engine.callbacks import MemorySample, StepEvent

log = logging.getLogger(__name__)
GB = 1024**3


def sample() -> MemorySample:
    if psutil is None:  # pragma: no cover
        return MemorySample(0.0, mx.get_active_memory() / GB, mx.get_peak_memory() / GB, float("inf"))
    vm = psutil.virtual_memory()
    return MemorySample(
        rss_gb=psutil.Process().memory_info().rss / GB,
        active_gb=mx.get_active_memory() / GB,
        peak_gb=mx.get_peak_memory() / GB,
        available_gb=vm.available / GB,
    )


def device_limit_gb() -> float | None:
    """The GPU's working-set limit (Metal/CUDA), None on CPU (system RAM is the limit there)."""
    try:
        if mx.default_device() == mx.cpu:
            return None
        info = mx.device_info()
        lim = (
            info.get("max_recommended_working_set_size")
            or info.get("memory_size")
            or info.get("total_memory")
        )
        return float(lim) / GB if lim else None
    except Exception:  # older MLX: no device_info
        return None


@contextmanager
def working_set_limit(limit_bytes: int | None) -> Iterator[None]:
    """Hold MLX's memory in use near ``limit_bytes`` on a GPU while the block runs (MLX's limit put back after).

    MLX queues a step's kernels ahead of the GPU, up to 10 command buffers (on CUDA each of up to 100
    kernels or 1 GB of inputs), and every buffer keeps the arrays its kernels read alive until the GPU has
    run it. Unchecked, that queue holds memory the step no longer needs: about 10 GB for the Mistral-7B
    shape with a 4-bit base on an H100, the same at 1 x 2,048 and 2 x 2,048 positions, with and without
    gradient checkpointing (bench/memory_plan.py, docs/benchmarks.md). ``mx.set_memory_limit`` is MLX's
    brake: while more than the limit is in use, evaluation waits for queued buffers to finish before it
    queues more (nothing fails: a step that truly needs more runs with a shorter queue). ``None``, or on
    CPU (nothing is queued ahead there): MLX's own limit."""
    if not limit_bytes or mx.default_device() == mx.cpu:
        yield
        return
    previous = mx.set_memory_limit(int(limit_bytes))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


# What MLX's allocators say when memory runs out (CPU malloc, Metal, CUDA), lower case.
_OOM_MESSAGES = (
    "unable to allocate",
    "out of memory",
    "outofmemory",
    "insufficient memory",
    "greater than the maximum allowed buffer size",
    "cudaerrormemoryallocation",
    "resource limit",
)
_simulated_limit: list[int | None] = [None]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is MLX (or Python) running out of memory."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(m in text for m in _OOM_MESSAGES)


def simulate_out_of_memory_above(positions: int | None) -> None:
    """A fault hook for tests (``FT_TEST_HOOK=oom-above:N`` in a real run): from now on a micro-batch of more
    than ``positions`` positions fails as MLX's allocator does when memory runs out; None = off."""
    _simulated_limit[0] = positions


def simulated_out_of_memory(positions: int) -> None:
    """Raise the simulated out-of-memory error when the hook is on and ``positions`` is above its limit."""
    limit = _simulated_limit[0]
    if limit is not None and positions > limit:
        raise RuntimeError(
            f"[malloc] Unable to allocate memory for a micro-batch of {positions} positions (simulated above {limit})"
        )


KNOBS = (
    "lower training.batch_size (raise grad_accumulation_steps to keep examples per step), "
    "lower data.max_seq_length, or target fewer modules / use qlora"
)


@dataclass
class MemoryMonitor:
    """Callback: attaches a memory sample to each logged step and warns once when memory gets tight.

    Tight = less than ``min_free_fraction`` of RAM left (CPU), or MLX's peak above ``max_device_fraction``
    of the GPU's working-set limit.
    """

    min_free_fraction: float = 0.08
    max_device_fraction: float = 0.92
    warnings: list[str] = field(default_factory=list)
    _warned: bool = False

    def on_step(self, event: StepEvent) -> None:
        s = event.memory or sample()
        event.memory = s
        msg = None
        total_gb = psutil.virtual_memory().total / GB if psutil is not None else float("inf")
        limit = device_limit_gb()
        if limit is not None and s.peak_gb > self.max_device_fraction * limit:
            msg = f"MLX peak memory {s.peak_gb:.1f} GB is close to the device limit {limit:.1f} GB"
        elif s.available_gb < self.min_free_fraction * total_gb:
            msg = (
                f"only {s.available_gb:.1f} GB of {total_gb:.1f} GB RAM left (process RSS {s.rss_gb:.1f} GB)"
            )
        if msg and not self._warned:
            self._warned = True
            text = f"memory is running out: {msg}; to use less: {KNOBS}"
            self.warnings.append(text)
            event.warning = text
            log.warning(text)
