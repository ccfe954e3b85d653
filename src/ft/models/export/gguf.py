"""GGUF export: write the float file, quantize with llama.cpp when asked, read it back, and check tensors,
tokenizer metadata, the chat template and logits (in MLX, and in llama.cpp when it is installed)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft import __version__
from ft.models.export.checks import (
    LLAMA_CPP_TOLERANCE,
    TENSOR_TOLERANCE,
    Check,
    Checks,
    Job,
    fail,
    np32,
    to_mx,
)

log = logging.getLogger("ft.services.export")


def export_gguf(
    job: Job,
    *,
    name: str,
    chat_template: str | None = None,
    chat_check: Callable[[Any, str | None, Checks], None] | None = None,
    stop: list[str] | None = None,
    imatrix: Any = None,
) -> str:
    """Write ``<name>-<quant>.gguf`` and a Modelfile (``stop``: where a reply ends) into ``tmp``, verified."""
    import numpy as np

    from ft.models.export import llamacpp, verify
    from ft.models.export.gguf_file import read_gguf, write_gguf
    from ft.models.export.gguf_vocab import chat_template as folder_template
    from ft.models.export.modelfile import modelfile

    tmp, tensors, config, base_dir, quant = job.tmp, job.tensors, job.config, job.base_dir, job.quant
    checks, ckpt, say = job.checks, job.ckpt, job.say
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
    fname = f"{slug}-{quant}.gguf"
    # Quantized files are made by llama.cpp's quantizer from an f16 file verified first.
    float_quant = quant if quant in ("f32", "f16", "bf16") else "f16"
    float_name = fname if float_quant == quant else f".{slug}-f16.gguf"
    t = time.perf_counter()
    shown = [0.0]

    def tensor_progress(i: int, n: int) -> None:
        if time.perf_counter() - shown[0] > 0.5 or i == n:
            shown[0] = time.perf_counter()
            say(f"writing GGUF ({float_quant}): tensor {i}/{n}")

    written = write_gguf(
        tmp / float_name,
        tensors,
        config,
        base_dir,
        float_quant,
        name=name,
        # No local path in the file: it may be pushed to the Hub.
        description=f"exported by ft {__version__}" + (f" from {ckpt.run_id} {ckpt.name}" if ckpt else ""),
        chat_template=chat_template,
        progress=tensor_progress,
    )
    checks.timed("write", t)
    t = time.perf_counter()
    say(f"verifying the {float_quant} GGUF file")
    back = read_gguf(tmp / float_name, config)
    _check_tensors(back, tensors, written, checks)
    template = chat_template or folder_template(base_dir)
    _check_tokenizer_meta(back, base_dir, tensors, template, written, checks)
    job.model.load_weights([(k, to_mx(np.asarray(v))) for k, v in back.tensors.items()], strict=False)
    job.check_logits(
        f"GGUF ({float_quant}) read back",
        verify.logits(job.model, job.ids),
        quant=float_quant,
        tune=float_quant == quant,  # a quantized file's tune is checked in llama.cpp
    )
    checks.timed("verify", t)
    if float_quant != quant:
        say(f"quantizing to {quant} with llama.cpp's quantizer")
        seconds = llamacpp.quantize(tmp / float_name, tmp / fname, quant, imatrix=imatrix)
        checks.timings["quantize"] = round(seconds, 3)
        _check_quantized_layout(tmp / float_name, tmp / fname, quant, checks)
        (tmp / float_name).unlink()
    if llamacpp.available():
        t = time.perf_counter()
        say(f"checking {fname} in llama.cpp")
        _check_in_llama_cpp(job, tmp / fname, tok_texts(base_dir), template, chat_check)
        checks.timed("llama.cpp check", t)
    else:
        checks.append(
            Check(
                name="llama.cpp",
                ok=True,
                detail="not run: llama-cpp-python is not installed (pip install 'ft[gguf]')",
            )
        )

    (tmp / "Modelfile").write_text(
        modelfile(
            fname,
            template,
            stop or [],
            context_length=int(config.get("max_position_embeddings") or 4096),
            tool_fallback=chat_template is not None,
        )
    )
    return fname


def _check_tensors(back: Any, tensors: dict[str, Any], written: Any, checks: Checks) -> None:
    """Every tensor read back: names and shapes as written, values within the precision's tolerance."""
    import numpy as np

    want = {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    got = {k: tuple(v.shape) for k, v in back.tensors.items()}
    problems = [f"{k} missing" for k in want if k not in got] + [
        f"{k} unexpected" for k in got if k not in want
    ]
    problems += [f"{k}: {got[k]} vs {want[k]}" for k in want if k in got and got[k] != want[k]]
    if problems:
        raise fail("tensor names/shapes", "; ".join(problems[:8]))
    worst_name, worst = "", 0.0
    for k, v in back.tensors.items():
        src = np.asarray(np32(tensors[k]))
        err = float(np.sqrt(np.mean((v - src) ** 2) / (np.mean(src**2) or 1.0)))
        limit = TENSOR_TOLERANCE["f32" if v.ndim == 1 else back.tensor_types[k].lower()]
        if err > limit:
            raise fail(
                "tensor values",
                f"{k} ({back.tensor_types[k]}) is off by relative RMS {err:.3g} (allowed {limit:g})",
            )
        if err > worst:
            worst_name, worst = k, err
    checks.append(
        Check(
            name="tensors",
            ok=True,
            detail=f"{len(got)} tensors, names and shapes match "
            f"({written.tensor_types}); largest relative RMS error {worst:.2g} ({worst_name})",
        )
    )


def _check_tokenizer_meta(
    back: Any, base_dir: Path, tensors: dict[str, Any], template: str | None, written: Any, checks: Checks
) -> None:
    """The GGUF's tokenizer metadata and chat template are the model's."""
    from ft.models.export.gguf_vocab import read_vocab

    vocab = read_vocab(base_dir, int(tensors["model.embed_tokens.weight"].shape[0]))
    meta = back.metadata
    tok_problems = []
    if list(meta.get("tokenizer.ggml.tokens") or []) != vocab.tokens:
        tok_problems.append("token list")
    if list(meta.get("tokenizer.ggml.token_type") or []) != vocab.token_types:
        tok_problems.append("token types")
    if template and meta.get("tokenizer.chat_template") != template:
        tok_problems.append("chat template")
    if tok_problems:
        raise fail("tokenizer metadata", "differs from the model's tokenizer in: " + ", ".join(tok_problems))
    notes = "; ".join(written.notes)
    checks.append(
        Check(
            name="tokenizer",
            ok=True,
            detail=f"{len(vocab.tokens)} tokens ({written.tokenizer_model}, "
            f"pre-tokenizer {written.pre_tokenizer}), special tokens and chat template written"
            + (f"; {notes}" if notes else ""),
        )
    )


def tok_texts(base_dir: Path) -> list[tuple[str, list[int]]]:
    """(text, Hugging Face token ids) pairs for the tokenizer check: the verification prompts, no BOS.

    (Chat prompts, with their special tokens, are compared by the chat template check.)"""
    from transformers import AutoTokenizer

    from ft.models.export import verify

    hf = AutoTokenizer.from_pretrained(str(base_dir))
    return [(p, list(hf.encode(p, add_special_tokens=False))) for p in verify.VERIFY_PROMPTS]


def _check_quantized_layout(float_file: Path, quant_file: Path, quant: str, checks: list[Check]) -> None:
    from collections import Counter

    from ft.models.gguf_import import read_gguf_header

    a, b = read_gguf_header(float_file), read_gguf_header(quant_file)
    want = {t.name: t.shape for t in a.tensors}
    got = {t.name: t.shape for t in b.tensors}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise fail(f"llama.cpp's {quant} file has other tensors than the f16 it was made from", str(diff))
    types = Counter(t.type_name for t in b.tensors)
    checks.append(
        Check(
            name="quantize",
            ok=True,
            detail=f"llama.cpp's quantizer wrote {len(got)} tensors ({dict(sorted(types.items()))})",
        )
    )


def _check_in_llama_cpp(
    job: Job,
    path: Path,
    texts: list[tuple[str, list[int]]],
    template: str | None,
    chat_check: Callable[[Any, str | None, Checks], None] | None,
) -> None:
    """Load the file in llama.cpp: its tokenizer must give the model's ids, its logits the MLX model's,
    its chat formatter the prompt ft trains on."""
    from ft.models.export import llamacpp

    llm = llamacpp.load(path)
    try:
        for text, want in texts:
            got = llamacpp.tokenize(llm, text)
            if got != want:
                raise fail("llama.cpp tokenizes differently", f"{text[:50]!r}: {got[:12]} vs {want[:12]}")
        if chat_check is not None:
            chat_check(llm, template, job.checks)
        got_logits = llamacpp.logits(llm, job.ids)
    finally:
        llm.close() if hasattr(llm, "close") else None
    job.check_logits(
        f"llama.cpp running {path.name}",
        got_logits,
        tune=job.quant not in ("f32", "f16", "bf16"),  # a float file's tune was checked on reading it back
        limits=LLAMA_CPP_TOLERANCE,
        name="llama.cpp",
    )
