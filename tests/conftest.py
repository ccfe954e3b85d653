"""Shared fixtures. Session-scoped ones build expensive things once per test run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


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
