"""Every architecture ft trains exports to a GGUF that llama.cpp (llama-cpp-python) runs like MLX.

One tiny random-weight model per family, written by the test with a tokenizer of its kind (byte-level
BPE with the Llama 3 or Qwen2 pre-tokenizer; SentencePiece BPE with or without the dummy-prefix space,
plus the family's special tokens), exported with `ft export --model NAME --format gguf --quant f16`.
Known answers: llama.cpp's logits equal MLX's within f16 rounding; llama.cpp's token ids equal the
Hugging Face tokenizer's on a probe text holding special tokens; the chat prompt llama-cpp-python renders
from the GGUF's template is the one ft renders, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")

# No space right after a special token: there SentencePiece tokenizers differ by design (llama.cpp always
# adds the dummy-prefix space, Hugging Face's Metaspace not before text that starts with one).
PROBE = "Hello world, the quick brown fox: café 2024! {eot}don't\n{bot}x"
CONVERSATIONS = {
    "plain": [("user", "hello world")],
    "system": [("system", "You are terse."), ("user", "the quick brown fox")],
    "multi-turn": [
        ("user", "hello"),
        ("assistant", "world model"),
        ("user", "export the llama"),
    ],
}


@pytest.fixture(scope="module")
def ws_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ft.services.project import init_workspace

    root = tmp_path_factory.mktemp("archs") / "ws"
    init_workspace(root)
    return root


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_family_exports_to_gguf_that_llama_cpp_runs_like_mlx(family: str, ws_root: Path):
    from transformers import AutoTokenizer

    from ft.models.export import llamacpp, verify
    from ft.models.loading import load
    from ft.services.export import export
    from ft.workspace import Workspace

    spec = tiny_models.FAMILIES[family]
    name = f"tiny-{family}"
    folder = ws_root / "models" / name
    config = tiny_models.write_family(folder, family)
    result = export(Workspace(ws_root), model=name, fmt="gguf", quant="f16")
    checks = {c.name: c for c in result.checks}
    assert checks["llama.cpp"].ok and checks["chat template"].ok, result.checks

    llm = llamacpp.load(Path(result.main_file))
    hf = AutoTokenizer.from_pretrained(str(folder))
    special = spec["special"] or [spec["eos"]]
    probe = PROBE.format(eot=special[-1], bot=special[0])
    assert llamacpp.tokenize(llm, probe) == hf.encode(probe, add_special_tokens=False), (
        family,
        hf.convert_ids_to_tokens(hf.encode(probe, add_special_tokens=False)),
    )
    assert llm.metadata["tokenizer.chat_template"] == spec["chat"]
    # The Modelfile stops at the template's end-of-turn marker (Gemma's <end_of_turn>, Phi-3's <|end|>, ...).
    modelfile = (Path(result.path) / "Modelfile").read_text()
    eot = {"gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>", "llama3": "<|eot_id|>"}
    eot |= {"qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>"}
    assert f'PARAMETER stop "{eot[family]}"' in modelfile, modelfile

    model, _ = load(folder, dtype="float32")
    ids = hf.encode("the quick brown fox jumps over the lazy dog hello world model", add_special_tokens=True)
    want = verify.logits(model, [ids])[0]
    got = llamacpp.logits(llm, [ids])[0]
    d = verify.diff([got], [want])
    # f16 weights (and llama.cpp's f16 KV cache) against MLX's float32: the f16 tolerance of `ft export`.
    assert d.rel < 3e-2 and d.top1 >= 0.9, (family, d.describe())
    if config.get("final_logit_softcapping"):
        assert np.abs(got).max() <= config["final_logit_softcapping"] + 1e-3


def test_gguf_problem_names_what_cannot_be_written():
    from ft.models.export.gguf_file import gguf_problem

    assert gguf_problem({"model_type": "starcoder2"}) is not None
    assert "yarn" in gguf_problem(
        {"model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}, "num_attention_heads": 4}
    )
    assert gguf_problem(json.loads(json.dumps(tiny_models.FAMILIES["llama3"]["config"]))) is None


def test_gguf_problem_reads_the_tokenizer_structure(tmp_path: Path):
    from tokenizers import Tokenizer, models

    from ft.models.export.gguf_file import gguf_problem

    config = tiny_models.FAMILIES["qwen2"]["config"]
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    assert "tokenizer model 'WordLevel'" in gguf_problem(config, tmp_path)
    tiny_models._bpe_tokenizer(tmp_path, "bpe-qwen2", ["<|im_end|>"])
    assert gguf_problem(config, tmp_path) is None


def test_imatrix_from_activations_reaches_llama_cpp_quantizer(tmp_path: Path):
    """The importance matrix (mean squared input per column, measured with MLX) is passed to llama.cpp's
    quantizer: rows of 256 values get real k-quants, and the q4_k_m file differs from one made without it."""
    import mlx.core as mx
    from transformers import AutoTokenizer

    from ft.models.export import llamacpp, verify
    from ft.models.export.gguf_file import write_gguf
    from ft.models.export.imatrix import compute_imatrix
    from ft.models.loading import load

    folder = tmp_path / "m"
    config = tiny_models.write_family(
        folder, "llama3", scale=1.0, overrides={"hidden_size": 256, "intermediate_size": 512}
    )
    model, _ = load(folder, dtype="float32")
    hf = AutoTokenizer.from_pretrained(str(folder))
    seqs = [hf.encode(t) for t in tiny_models._corpus(40)]
    im = compute_imatrix(model, seqs, config)
    assert im.values["blk.0.attn_q.weight"].shape == (256,) and im.values["blk.1.ffn_down.weight"].shape == (
        512,
    )
    assert all(float(v.min()) > 0 for v in im.values.values())
    f16 = tmp_path / "f16.gguf"
    write_gguf(f16, dict(mx.load(str(folder / "model.safetensors"))), config, folder, "f16", name="t")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "imatrix.gguf"
    llamacpp.quantize(f16, plain, "q4_k_m")
    llamacpp.quantize(f16, weighted, "q4_k_m", imatrix=im)
    assert plain.read_bytes() != weighted.read_bytes()
    probe = [hf.encode(t) for t in tiny_models._corpus(4)]
    want = verify.logits(model, probe)
    for path in (plain, weighted):
        llm = llamacpp.load(path)
        d = verify.diff(llamacpp.logits(llm, probe), want)
        assert d.rel < 0.5, (path.name, d.describe())
