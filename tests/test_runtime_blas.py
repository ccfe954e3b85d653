"""Which optimized BLAS ft preloads: MKL first on Intel CPUs, OpenBLAS first elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from ft.engine import runtime


@pytest.fixture
def libs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    mkl = tmp_path / "venv" / "lib" / "libmkl_rt.so.3"
    openblas = tmp_path / "usr" / "lib" / "x86_64-linux-gnu" / "openblas-pthread" / "libblas.so.3"

    def setup(vendor: str, with_mkl: bool, with_openblas: bool) -> tuple[Path, Path]:
        for p, on in ((mkl, with_mkl), (openblas, with_openblas)):
            p.parent.mkdir(parents=True, exist_ok=True)
            if on:
                p.write_bytes(b"")
            elif p.exists():
                p.unlink()
        monkeypatch.setattr(runtime, "_cpu_vendor", lambda: vendor)
        monkeypatch.setattr(runtime, "_find_mkl", lambda: mkl if mkl.exists() else None)
        monkeypatch.setattr(
            runtime, "_CANDIDATES", (str(tmp_path / "usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"),)
        )
        return mkl, openblas

    return setup


def test_mkl_first_on_intel(libs) -> None:  # type: ignore[no-untyped-def]
    mkl, _ = libs("GenuineIntel", True, True)
    assert runtime.find_fast_blas() == mkl


def test_openblas_first_elsewhere(libs) -> None:  # type: ignore[no-untyped-def]
    _, openblas = libs("AuthenticAMD", True, True)
    assert runtime.find_fast_blas() == openblas


def test_each_alone_and_none(libs) -> None:  # type: ignore[no-untyped-def]
    mkl, openblas = libs("AuthenticAMD", True, False)
    assert runtime.find_fast_blas() == mkl
    libs("GenuineIntel", False, True)
    assert runtime.find_fast_blas() == openblas
    libs("GenuineIntel", False, False)
    assert runtime.find_fast_blas() is None


def test_blas_kind_names_the_library() -> None:
    assert runtime.blas_kind("/venv/lib/libmkl_rt.so.3") == "mkl"
    assert runtime.blas_kind("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3") == "openblas"
    assert runtime.blas_kind("/venv/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0") == "reference"
