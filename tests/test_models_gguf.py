"""The embedded SmolLM2 GGUF imported into an mlx-lm folder: known token ids, perplexity, answers."""

from __future__ import annotations

import json
import math

import pytest

from ft.models.loading import load_model_dir

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital "
    "of Germany. Once upon a time, there was a little girl who lived in a village near the forest."
)
SQL = "SELECT Notes FROM 1-1000181-1 WHERE Current slogan = 'SOUTH AUSTRALIA'"
SQL_IDS = [23428, 17304, 18451, 216, 33, 29, 33, 32, 32, 32, 33, 40, 33, 29, 33, 28531, 7007, 34077, 446, 637,
           12369, 19320, 33321, 17136, 3206, 7854, 23]  # fmt: skip
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
            8182, 2, 198, 1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198]  # fmt: skip


def perplexity(model, tokenizer, text: str) -> float:
    import mlx.core as mx
    import mlx.nn as nn

    ids = mx.array([tokenizer.encode(text)])
    logits = model(ids[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model_dir(smollm2_dir, dequantize=False)


def test_folder_keeps_quantization_as_stored(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    # Q4_1 everywhere except the embedding, which the file stores as Q8_0.
    assert config["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    tconfig = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tconfig["chat_template"]
    assert tconfig["eos_token"] == "<|im_end|>"


def test_tokenizer_known_ids(smollm2):
    tok = smollm2.tokenizer
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode(SQL) == SQL_IDS
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    assert list(chat) == CHAT_IDS
    assert tok.eos_token_ids == {2}


def test_perplexity_and_answers(smollm2):
    from mlx_lm import generate

    model, tok = smollm2.model, smollm2.tokenizer
    assert smollm2.quantized and not smollm2.dequantized
    ppl = perplexity(model, tok, PARAGRAPH)
    print(f"SmolLM2 (4-bit as stored) perplexity on the fixed paragraph: {ppl:.2f}")
    # Hugging Face q/k row order gives ~11.1; the rows as llama.cpp stores them give ~41, wrong-way permuted ~600.
    assert 5 < ppl < 16
    text = generate(model, tok, "The capital of France is", max_tokens=8)
    assert "Paris" in text
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)  # fmt: skip
    answer = generate(model, tok, prompt, max_tokens=16)
    print("chat answer:", repr(answer))
    assert "Paris" in answer


def test_dequantized_float32_matches(smollm2_dir, smollm2):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    loaded = load_model_dir(smollm2_dir)  # on CPU: automatic float32 dequantization
    if not loaded.dequantized:
        pytest.skip("not on CPU or not enough memory for float32")
    assert loaded.dtype == "float32"
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(loaded.model.parameters()))
    ppl_q = perplexity(smollm2.model, smollm2.tokenizer, PARAGRAPH)
    ppl_f = perplexity(loaded.model, loaded.tokenizer, PARAGRAPH)
    print(f"perplexity 4-bit {ppl_q:.3f} vs dequantized float32 {ppl_f:.3f}")
    assert abs(ppl_q - ppl_f) / ppl_q < 0.01
