"""Quantized GGUF acceptance on the tuned embedded model (SmolLM2-135M + a real LoRA tune), in llama.cpp.

For each type llama.cpp's quantizer makes: the file loads in llama-cpp-python; top-1 agreement with the
MLX model (adapter-on-base, float32) on held-out conversations, teacher-forced; and the perplexity
increase over the f16 file on those conversations (a validation split of ft's sample dataset, seed and
records never trained on). Limits per type are docs/export.md's table (QUANT_LIMITS below); the test
fails when one is exceeded. f16 and the default q4_k_m go through `ft export` end to end; the other types
are made by the same quantizer call from that verified f16 file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import export_tune as tune

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# type -> (min top-1 agreement with MLX, max perplexity increase over f16). docs/export.md has the same table.
# Measured (24 conversations x 96 tokens): f16 99.8% / +0%, q8_0 96.0% / +2.2%, q4_k_m 86.2% / -20.6%
# (the small one-question tune leaves this text at perplexity ~168, where 4-bit noise can lower it).
QUANT_LIMITS = {
    "f16": (0.97, 0.005),
    "q8_0": (0.90, 0.05),
    "q6_k": (0.90, 0.05),
    "q5_k_m": (0.85, 0.10),  # not met on this model: `ft export` must refuse it (checked below)
    "q4_k_m": (0.75, 0.10),
    "q4_0": (0.50, 0.25),
}


@pytest.fixture(scope="module")
def workspace(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    ckpt = tune.cached_checkpoint(smollm2_dir, Path(request.config.rootpath) / ".pytest_cache" / "ft-export")
    return tune.make_workspace(tmp_path_factory.mktemp("export-quants") / "ws", smollm2_dir, ckpt)


@pytest.fixture(scope="module")
def held_out(workspace: Path) -> list[list[int]]:
    """Token ids of 12 conversations of ft's sample dataset the tune never saw, rendered with the chat template."""
    from transformers import AutoTokenizer

    from ft.data.sample import sample_records

    tok = AutoTokenizer.from_pretrained(str(workspace / "models" / tune.BASE_NAME))
    out = []
    for rec in list(sample_records(n=12, seed=2027)):
        text = tok.apply_chat_template(rec["conversations"], tokenize=False)
        out.append(tok.encode(text, add_special_tokens=False)[:64])
    return out


def _perplexity(logits: list[np.ndarray], ids: list[list[int]]) -> float:
    nll = n = 0.0
    for z, seq in zip(logits, ids, strict=True):
        z = z[:-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(seq) - 1), seq[1:]].sum())
        n += len(seq) - 1
    return math.exp(nll / n)


def test_each_quant_type_loads_agrees_with_mlx_and_keeps_perplexity(workspace: Path, held_out):
    from ft.errors import FtError
    from ft.models.export import llamacpp, verify
    from ft.models.loading import load
    from ft.services.export import apply_checkpoint, export, resolve_checkpoint
    from ft.workspace import Workspace

    ws = Workspace(workspace)
    f16 = export(ws, fmt="gguf", quant="f16")
    q4km = export(ws, fmt="gguf", quant="q4_k_m")
    assert q4km.timings.get("quantize", 0) > 0 and any(c.name == "quantize" for c in q4km.checks)

    ckpt = resolve_checkpoint(ws, None, "best")
    model, _ = load(ckpt.base_model_dir, dequantize=True, dtype="float32")
    apply_checkpoint(model, ckpt)
    want = verify.logits(model, held_out)

    files = {"f16": Path(f16.main_file), "q4_k_m": Path(q4km.main_file)}
    scratch = Path(f16.path).parent / "quants"
    scratch.mkdir(exist_ok=True)
    for q in ("q8_0", "q6_k", "q5_k_m", "q4_0"):
        files[q] = scratch / f"{q}.gguf"
        llamacpp.quantize(files["f16"], files[q], q)

    report, ppl = [], {}
    for q, path in files.items():
        llm = llamacpp.load(path)
        got = llamacpp.logits(llm, held_out)
        llm.close()
        d = verify.diff(got, want)
        ppl[q] = _perplexity(got, held_out)
        report.append((q, d.top1, ppl[q], path.stat().st_size))
    ppl_mlx = _perplexity(want, held_out)
    lines = [f"MLX float32 perplexity {ppl_mlx:.3f}"]
    failures = []
    for q, top1, p, size in report:
        min_top1, max_increase = QUANT_LIMITS[q]
        increase = p / ppl["f16"] - 1
        lines.append(
            f"{q}: {size / 1e6:.1f} MB, top-1 vs MLX {top1:.1%}, perplexity {p:.3f} ({increase:+.2%} vs f16)"
        )
        if top1 < min_top1 or (max_increase is not None and increase > max_increase):
            failures.append(q)
    print("\n".join(lines))
    # llama.cpp's q5_k_m of SmolLM2-135M is worse than its q4_k_m (rows of 576 values fall back from
    # k-quant blocks): the held-out numbers say so, and ft's own export check refuses the file.
    assert failures == ["q5_k_m"], "\n".join(lines)
    with pytest.raises(FtError) as e:
        export(ws, fmt="gguf", quant="q5_k_m")
    assert "logits differ from the MLX model" in e.value.message and "allowed at q5_k_m" in e.value.message
