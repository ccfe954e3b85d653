"""llama.cpp itself, through llama-cpp-python: its quantizer (k-quants) and its forward pass (checks).

GGUF files at q8_0, q6_k, q5_k_m, q4_k_m and q4_0 are made by llama.cpp's own quantizer
(``llama_model_quantize``, what the ``llama-quantize`` tool calls) from the f16 file ft has written and
verified, so the quantized layout (super-blocks, which tensors keep more bits in a "_m" mix) is exactly
llama.cpp's. The quantized file is then checked by running it in llama.cpp: logits on the verification
prompts against the MLX model.

llama-cpp-python builds llama.cpp from source; it is an optional dependency (``pip install 'ft[gguf]'``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ft.errors import ErrorCode, FtError

# --quant name -> llama.cpp's LLAMA_FTYPE_* constant name (resolved on the installed llama_cpp).
LLAMA_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def require() -> Any:
    """The llama_cpp module, or FtError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise FtError(
            ErrorCode.PACKAGE_MISSING,
            "quantized GGUF files are made by llama.cpp's own quantizer, which needs llama-cpp-python",
            "pip install 'ft[gguf]' (builds llama.cpp, ~25 min on 2 cores), or export --quant f16 / bf16 / f32",
        ) from e
    return llama_cpp


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """llama.cpp logs to file descriptor 2; keep it off the terminal and hand it back for error messages."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


@dataclass
class Imatrix:
    """Importance of each input column of each weight (mean squared activation), by GGUF tensor name."""

    values: dict[str, np.ndarray]
    tokens: int


def quantize(
    src: Path, dst: Path, quant: str, *, threads: int | None = None, imatrix: Imatrix | None = None
) -> float:
    """Quantize GGUF ``src`` (f16/f32) into ``dst`` at ``quant`` with llama.cpp; returns the seconds it took."""
    import ctypes

    llama_cpp = require()
    if quant not in LLAMA_FTYPES:
        raise FtError(
            ErrorCode.USAGE, f"llama.cpp quantization {quant!r} is not one of {', '.join(LLAMA_FTYPES)}"
        )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[quant])
    params.nthread = int(threads or os.cpu_count() or 1)
    keep: list[Any] = []  # ctypes buffers must outlive the call
    if imatrix is not None:
        entry = llama_cpp.llama_model_imatrix_data if hasattr(llama_cpp, "llama_model_imatrix_data") else None
        if entry is None:
            raise FtError(
                ErrorCode.PACKAGE_MISSING,
                "this llama-cpp-python cannot pass an importance matrix to the quantizer",
                "upgrade llama-cpp-python, or export without --imatrix",
            )
        items = sorted(imatrix.values.items())
        arr = (entry * (len(items) + 1))()
        for i, (name, values) in enumerate(items):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep += [buf, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, type(params.imatrix))
    t0 = time.perf_counter()
    with _captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        tail = "; ".join(line for line in log[-6:] if line.strip())
        raise FtError(
            ErrorCode.EXPORT_FAILED,
            f"llama.cpp's quantizer failed to make {quant} from {Path(src).name} (code {rc}): {tail or 'no message'}",
            "export --quant f16 and quantize it with llama.cpp's llama-quantize to see its full log",
        )
    return time.perf_counter() - t0


def load(path: Path, *, n_ctx: int = 512, vocab_only: bool = False) -> Any:
    """A llama_cpp.Llama on ``path`` with every position's logits kept, quiet."""
    llama_cpp = require()
    try:
        with _captured_stderr() as log:
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=max(1, min(4, os.cpu_count() or 1)),
                logits_all=True,
                vocab_only=vocab_only,
                verbose=False,
            )
    except Exception as e:  # llama.cpp's refusal, with its own log lines
        tail = "; ".join(line for line in log[-6:] if line.strip())
        raise FtError(
            ErrorCode.EXPORT_FAILED,
            f"llama.cpp cannot load {Path(path).name}: {e}" + (f" ({tail})" if tail else ""),
        ) from e


def logits(llm: Any, ids: list[list[int]]) -> list[np.ndarray]:
    """Float32 logits (tokens x vocabulary) llama.cpp computes for each prompt."""
    out = []
    for seq in ids:
        llm.reset()
        llm.eval(list(seq))
        out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
    return out


def tokenize(llm: Any, text: str, *, add_bos: bool = False) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))


def special_text(llm: Any, token_id: int) -> str:
    return llm._model.token_get_text(token_id) if token_id != -1 else ""


def render_chat(llm: Any, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
    """The prompt tokens llama-cpp-python's chat completion feeds the model for ``messages``.

    Rendered by llama-cpp-python's own Jinja chat formatter from the template stored in the GGUF, with the
    BOS/EOS text it reads from the file, then tokenized as its chat completion does (special tokens parsed,
    no extra BOS). ``extra`` (e.g. ``tools=[...]``) is passed to the template.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise FtError(ErrorCode.EXPORT_FAILED, "the GGUF file carries no chat template")
    fmt = Jinja2ChatFormatter(
        template=template,
        eos_token=special_text(llm, llm.token_eos()),
        bos_token=special_text(llm, llm.token_bos()),
    )
    result = fmt(messages=messages, **extra)  # type: ignore[arg-type]  # llama_cpp's TypedDicts
    return tokenize(llm, result.prompt, add_bos=not result.added_special)
