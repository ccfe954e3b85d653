"""Facts about the MLX runtime: device, BLAS library, memory; and the optimized-BLAS preload on Linux.

MLX's Linux CPU wheel links a reference BLAS (a few GFLOP/s). When an optimized one is installed
(the `mkl` PyPI package, a dependency of ft on x86-64 Linux, or Debian's libopenblas0-pthread) ft
re-executes itself once with it in LD_PRELOAD, which makes CPU training 25x faster or more.
FT_NO_BLAS_PRELOAD=1 turns this off.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

PRELOAD_MARK = "FT_BLAS_PRELOADED"  # set in the re-executed process so we never loop

# Optimized BLAS libraries exporting the standard cblas_* symbols MLX calls, best first.
_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib64/libopenblas*.so*",
)


def _cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... ('' where /proc/cpuinfo does not say)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux, or no /proc
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("vendor_id")), "")


def _find_mkl() -> Path | None:
    # The `mkl` PyPI package (a dependency of ft on x86-64 Linux) puts libmkl_rt into the environment's
    # lib folder, next to the libraries it loads itself (threading layer, libiomp5).
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    for base in (Path(sys.prefix) / "lib", libdir):
        for hit in sorted(base.glob("libmkl_rt.so*")):
            return hit
    return None


def find_fast_blas() -> Path | None:
    """An optimized BLAS library on this machine, or None.

    MKL first on Intel CPUs: at a small model's shapes (420 x 576 by 576 x 1536, float32) it ran
    5-6x faster than OpenBLAS on the 2-core Xeon of CI (bench/train_cpu.py measures training steps).
    """
    mkl = _find_mkl()
    if mkl is not None and _cpu_vendor() == "GenuineIntel":
        return mkl
    for pattern in _CANDIDATES:
        for hit in sorted(glob.glob(pattern)):
            return Path(hit)
    return mkl


def loaded_blas() -> str:
    """The BLAS shared library mapped into this process ('' when unknown, e.g. on macOS: Accelerate)."""
    if platform.system() == "Darwin":
        return "Accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ""
    names = []
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        base = os.path.basename(path)
        if "scipy_openblas" in base:  # numpy's own copy (64-bit-integer symbols): not the one MLX calls
            continue
        if any(k in base for k in ("blas", "mkl_rt", "openblas")) and path not in names:
            names.append(path)
    return ", ".join(names)


def blas_kind(libs: str | None = None) -> str:
    libs = loaded_blas() if libs is None else libs
    if "Accelerate" in libs:
        return "accelerate"
    if "openblas" in libs:
        return "openblas"
    if "mkl" in libs:
        return "mkl"
    return "reference" if libs else "unknown"


def maybe_reexec_with_fast_blas(argv: list[str] | None = None) -> None:
    """On Linux, re-execute the current command once with an optimized BLAS preloaded.

    Does nothing on macOS, when disabled, when already done, or when no optimized BLAS exists.
    Must run before mlx is imported (the dynamic linker binds BLAS symbols at load time).
    """
    if platform.system() != "Linux" or os.environ.get(PRELOAD_MARK):
        return
    from ft.config.settings import load_settings

    if load_settings().no_blas_preload:
        return
    if "mlx.core" in sys.modules:
        return
    lib = find_fast_blas()
    if lib is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if str(lib) in preload.split(":"):
        os.environ[PRELOAD_MARK] = str(lib)
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (str(lib), preload) if p)
    env[PRELOAD_MARK] = str(lib)
    args = argv if argv is not None else sys.argv
    # Re-run the same interpreter on the same entry point; sys.orig_argv keeps `-m ft` and -X flags.
    orig = getattr(sys, "orig_argv", None) or [sys.executable, *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *orig[1:]], env)


@dataclass(frozen=True)
class RuntimeInfo:
    mlx_version: str
    device: str
    backend: str  # metal | cuda | cpu
    blas: str
    blas_libraries: str
    fast_blas_available: str | None


def runtime_info() -> RuntimeInfo:
    import mlx.core as mx

    backend = "cpu"
    if mx.metal.is_available():
        backend = "metal"
    elif hasattr(mx, "cuda") and mx.cuda.is_available():
        backend = "cuda"
    libs = loaded_blas()
    fast = find_fast_blas()
    return RuntimeInfo(
        mlx_version=mx.__version__,
        device=str(mx.default_device()),
        backend=backend,
        blas=blas_kind(libs),
        blas_libraries=libs,
        fast_blas_available=str(fast) if fast else None,
    )


def matmul_gflops(n: int = 1024, seconds: float = 0.5, device: str = "cpu") -> float:
    """Measured float32 n x n matmul throughput on the given device (GFLOP/s)."""
    import mlx.core as mx

    dev = mx.cpu if device == "cpu" else mx.gpu
    with mx.stream(dev):
        a = mx.random.normal((n, n))
        b = mx.random.normal((n, n))
        mx.eval(a, b)
        mx.eval(a @ b)  # warm-up: first call pays for thread start-up and allocation
        reps, start = 0, time.perf_counter()
        while True:
            mx.eval(a @ b)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and reps >= 2:
                break
    return 2 * n**3 * reps / elapsed / 1e9
