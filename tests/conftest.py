"""Shared fixtures. Session-scoped ones build expensive things once per test run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Run the tests with the optimized BLAS that `ft` itself preloads on Linux (MLX's own is ~15x slower).

    Re-executes pytest once with LD_PRELOAD set, exactly as the `ft` command does; FT_NO_BLAS_PRELOAD=1
    turns it off. Capturing is stopped first so the re-executed run writes to the real terminal.
    """
    import os
    import sys

    from ft.config.settings import load_settings
    from ft.engine import runtime

    lib = runtime.find_fast_blas()
    if (
        sys.platform != "linux"
        or lib is None
        or os.environ.get(runtime.PRELOAD_MARK)
        or str(lib) in os.environ.get("LD_PRELOAD", "").split(":")
        or load_settings().no_blas_preload
        or "mlx.core" in sys.modules
    ):
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.stop_global_capturing()
    runtime.maybe_reexec_with_fast_blas()  # does not return


@pytest.fixture(scope="session")
def smollm2_dir(request: pytest.FixtureRequest) -> Path:
    """The embedded SmolLM2-135M-Instruct imported into an mlx-lm folder (4-bit, as stored).

    Imported once and cached under .pytest_cache, keyed on the GGUF file and the importer's source,
    so a change to the importer re-imports. Treat the folder as read-only.
    """
    from ft.models import gguf_import
    from ft.models.embedded import embedded_gguf_path

    gguf = embedded_gguf_path()
    key = hashlib.sha256(
        Path(gguf_import.__file__).read_bytes() + f"{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()
    ).hexdigest()[:16]
    final = Path(request.config.rootpath) / ".pytest_cache" / "ft-models" / f"smollm2-{key}"
    if not (final / gguf_import.CONFIG_FILE).is_file():
        try:
            gguf_import.import_gguf(gguf, final)
        except Exception:
            # Another test session may have finished the same import first; use it if it did.
            if not (final / gguf_import.CONFIG_FILE).is_file():
                raise
    return final


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    """The embedded SmolLM2's tokenizer as the data pipeline uses it (``ft.data.tokenize.TextTokenizer``)."""
    from ft.services.datasets import load_tokenizer

    return load_tokenizer(smollm2_dir, "smollm2-135m-instruct")
