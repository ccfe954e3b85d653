"""Facts about a model folder read from its files alone (no weights loaded): tensors, parameters, sizes, hashes."""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.errors import ErrorCode, FtError
from ft.workspace.atomic import sha256_file

# Files that make a model folder; everything else in a repository is left behind.
WEIGHT_GLOB = "model*.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class FolderInfo:
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    weight_files: list[Path] = field(default_factory=list)
    size_bytes: int = 0  # every file in the folder

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def quant_params(self, module: str) -> tuple[int, int] | None:
        """(bits, group_size) of a quantized module, None when it is stored in floating point."""
        if f"{module}.scales" not in self.tensors:
            return None
        q = self.config.get("quantization") or self.config.get("quantization_config") or {}
        per = q.get(module)
        if isinstance(per, dict):
            return int(per.get("bits", 4)), int(per.get("group_size", 64))
        w, s = self.tensors[f"{module}.weight"], self.tensors[f"{module}.scales"]
        group = int(q.get("group_size", 64))
        in_dims = s.shape[-1] * group
        return (w.shape[-1] * 32 // in_dims if in_dims else int(q.get("bits", 4))), group

    def parameters(self) -> int:
        """Parameters of the unquantized model (a 4-bit weight counts its logical elements)."""
        total = 0
        for name, t in self.tensors.items():
            if name.endswith((".scales", ".biases")) and f"{name.rsplit('.', 1)[0]}.scales" in self.tensors:
                continue  # quantization metadata, not parameters
            n = 1
            for d in t.shape:
                n *= d
            if name.endswith(".weight"):
                q = self.quant_params(name[: -len(".weight")])
                if q is not None:
                    n = n * 32 // q[0]
            total += n
        return total

    def quantization_summary(self) -> str:
        """'none', '4-bit', or '4-bit (model.embed_tokens 8-bit)'."""
        bits: Counter[int] = Counter()
        for name in self.tensors:
            if name.endswith(".scales"):
                q = self.quant_params(name[: -len(".scales")])
                if q:
                    bits[q[0]] += 1
        if not bits:
            return "none"
        main = bits.most_common(1)[0][0]
        others = sorted(
            name[: -len(".scales")]
            for name in self.tensors
            if name.endswith(".scales") and (self.quant_params(name[: -len(".scales")]) or (0,))[0] != main
        )
        extra = ", ".join(f"{m} {self.quant_params(m)[0]}-bit" for m in others[:3])  # type: ignore[index]
        return f"{main}-bit" + (f" ({extra})" if extra else "")

    def float_dtype(self) -> str:
        kinds = Counter(
            t.dtype
            for n, t in self.tensors.items()
            if t.dtype in {"F32", "F16", "BF16"} and not n.endswith((".scales", ".biases"))
        )
        name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
        return name[kinds.most_common(1)[0][0]] if kinds else "unknown"


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes from a .safetensors header (8-byte length + JSON); no data read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{path} is not a readable safetensors file ({e})",
            "pull the model again",
        ) from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = TensorInfo(name, info["dtype"], tuple(info["shape"]), int(end) - int(start))
    return out


def inspect_folder(folder: Path) -> FolderInfo:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FtError(ErrorCode.MODEL_INVALID, f"{folder} has no config.json", "is this a model folder?")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FtError(ErrorCode.MODEL_INVALID, f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    info = FolderInfo(config=config)
    info.weight_files = sorted(folder.glob(WEIGHT_GLOB))
    for wf in info.weight_files:
        info.tensors.update(read_safetensors_header(wf))
    info.size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return info


def check_loadable_folder(folder: Path) -> None:
    """A folder must have config.json and safetensors weights; pickle-only checkpoints are refused."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{folder} is not a model folder: no config.json",
            "a model folder holds config.json, model*.safetensors and tokenizer files (Hugging Face or MLX layout)",
        )
    if not list(folder.glob(WEIGHT_GLOB)):
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise FtError(
                ErrorCode.MODEL_UNSUPPORTED,
                f"{folder} has only pickle weights ({', '.join(pickles[:3])}); ft never loads pickle files "
                "(they can run arbitrary code)",
                "use a safetensors copy of this model (most Hugging Face repos have one)",
            )
        raise FtError(ErrorCode.MODEL_INVALID, f"{folder} has no model*.safetensors weights")
    if not any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise FtError(
            ErrorCode.MODEL_INVALID, f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)"
        )


def weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weights file, by file name."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob(WEIGHT_GLOB))}
