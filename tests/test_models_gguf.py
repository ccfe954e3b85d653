"""The embedded SmolLM2 GGUF imported into an mlx-lm folder: known token ids, perplexity, answers."""

from __future__ import annotations

import json
import math

import pytest

from ft.errors import ErrorCode, FtError
from ft.models.loading import load_model_dir

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital "
    "of Germany. Once upon a time, there was a little girl who lived in a village near the forest."
)
SQL = "SELECT Notes FROM 1-1000181-1 WHERE Current slogan = 'SOUTH AUSTRALIA'"
SQL_IDS = [
    23428,
    17304,
    18451,
    216,
    33,
    29,
    33,
    32,
    32,
    32,
    33,
    40,
    33,
    29,
    33,
    28531,
    7007,
    34077,
    446,
    637,
    12369,
    19320,
    33321,
    17136,
    3206,
    7854,
    23,
]
CHAT_IDS = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3511,
    308,
    34519,
    28,
    7018,
    411,
    407,
    19712,
    8182,
    2,
    198,
    1,
    4093,
    198,
    6004,
    2,
    198,
    1,
    520,
    9531,
    198,
    19556,
    17,
    2,
    198,
]


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
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    tconfig = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tconfig["chat_template"]
    assert tconfig["eos_token"] == "<|im_end|>"


def test_tokenizer_known_ids(smollm2):
    tok = smollm2.tokenizer
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode(SQL) == SQL_IDS
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    )
    assert list(chat) == CHAT_IDS
    assert tok.eos_token_ids == {2}


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_dir):
    return load_model_dir(smollm2_dir)  # on CPU: automatic float32 dequantization (the training path)


def test_perplexity(smollm2_f32):
    ppl = perplexity(smollm2_f32.model, smollm2_f32.tokenizer, PARAGRAPH)
    print(f"SmolLM2 perplexity on the fixed paragraph: {ppl:.2f}")
    # Hugging Face q/k row order gives ~11.1; the rows as llama.cpp stores them give ~41, permuted the wrong way ~600.
    assert 5 < ppl < 16


def test_greedy_answers(smollm2_f32):
    from mlx_lm import generate

    model, tok = smollm2_f32.model, smollm2_f32.tokenizer
    text = generate(model, tok, "The capital of France is", max_tokens=8)
    print("completion:", repr(text))
    assert "Paris" in text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = generate(
        model, tok, tok.apply_chat_template(messages, add_generation_prompt=True), max_tokens=16
    )
    print("chat answer:", repr(answer))
    assert "Paris" in answer


def test_dequantized_float32_matches_as_stored(smollm2, smollm2_f32):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if not smollm2_f32.dequantized:
        pytest.skip("not on CPU or not enough memory for float32")
    assert smollm2.quantized and not smollm2.dequantized
    assert (
        smollm2_f32.dtype == "float32" and "dequantized" in smollm2_f32.note and "float32" in smollm2_f32.note
    )
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(smollm2_f32.model.parameters()))
    # A short input: quantized matmuls on CPU are slow (that is why training dequantizes).
    ids = mx.array([smollm2.tokenizer.encode("Paris is the capital of")])
    q = smollm2.model(ids).astype(mx.float32)
    f = smollm2_f32.model(ids)
    diff = mx.abs(q - f).max().item()
    print(f"max |logit difference| 4-bit as stored vs float32: {diff:.4f}")
    assert diff < 0.1 and mx.array_equal(q.argmax(-1), f.argmax(-1)).item()


# --------------------------------------------------------------------------------------------
# Synthetic GGUF files written the way llama.cpp's converter writes them, from a tiny random Llama.
# --------------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_folder, *, linear_type="F32", embed_type="F32", arch="llama", extra_tensor=None):
    import gguf
    import mlx.core as mx
    import numpy as np

    config = json.loads((hf_folder / "config.json").read_text())
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    weights = {
        k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(hf_folder / "model.safetensors")).items()
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(2048)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def add(name, arr, qtype):
        t = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), t), raw_dtype=t)

    add("token_embd.weight", weights["model.embed_tokens.weight"], embed_type)
    add("output.weight", weights["lm_head.weight"], linear_type)
    add("output_norm.weight", weights["model.norm.weight"], "F32")
    for i in range(config["num_hidden_layers"]):
        for hf, gg in _GGUF_NAMES.items():
            arr = weights[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                arr = _llama_cpp_permute(arr, config["num_attention_heads"])
            if hf == "self_attn.k_proj":
                arr = _llama_cpp_permute(arr, config["num_key_value_heads"])
            add(f"blk.{i}.{gg}.weight", arr, "F32" if arr.ndim == 1 else linear_type)
    if extra_tensor is not None:
        name, arr, qtype = extra_tensor
        w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny_models import write_tiny_llama

    folder = tmp_path_factory.mktemp("tiny-hf")
    write_tiny_llama(folder, seed=3)
    return folder


@pytest.mark.parametrize(
    ("linear", "embed", "min_corr"),
    [
        ("F32", "F32", None),
        ("F16", "F16", 0.99999),
        ("Q8_0", "Q8_0", 0.999),
        ("Q4_0", "Q8_0", 0.9),
        ("Q4_1", "Q8_0", 0.9),
    ],
)
def test_gguf_import_round_trip(tmp_path, tiny_hf, linear, embed, min_corr):
    import numpy as np
    from tests.tiny_models import logits_of

    from ft.models.gguf_import import import_gguf

    gguf_file = write_gguf(tmp_path / "tiny.gguf", tiny_hf, linear_type=linear, embed_type=embed)
    result = import_gguf(gguf_file, tmp_path / "imported")
    if linear.startswith("Q"):
        bits = 8 if linear == "Q8_0" else 4
        assert result.quantization["bits"] == bits and result.quantization["group_size"] == 32
        if embed != linear:  # the per-tensor exception is named, as in the SmolLM2 file
            assert result.quantization["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    else:
        assert result.quantization is None
    ref, got = np.array(logits_of(tiny_hf)), np.array(logits_of(tmp_path / "imported"))
    if min_corr is None:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)  # float32: exact up to rounding
    else:
        assert np.corrcoef(ref, got)[0, 1] > min_corr
    # The q/k rows were put back into Hugging Face order: without that the logits would differ wildly.
    from ft.models.loading import load

    _, tok_imported = load(tmp_path / "imported", dequantize=False)
    _, tok_ref = load(tiny_hf, dequantize=False)
    text = "Once upon a time, Paris and Berlin!"
    assert tok_imported.encode(text) == tok_ref.encode(text)


def test_gguf_refusals(tmp_path, tiny_hf):
    import numpy as np

    from ft.models.gguf_import import import_gguf

    # A K-quant tensor: refused by name, before anything is loaded.
    q4k = np.zeros((64, 144), dtype=np.uint8)  # 64 rows of one 256-element Q4_K block
    bad = write_gguf(tmp_path / "k.gguf", tiny_hf, extra_tensor=("blk.0.extra.weight", q4k, "Q4_K"))
    with pytest.raises(FtError) as e:
        import_gguf(bad, tmp_path / "out-k")
    assert e.value.code == ErrorCode.MODEL_UNSUPPORTED and "Q4_K" in e.value.message
    assert not (tmp_path / "out-k").exists()

    other = write_gguf(tmp_path / "gpt2.gguf", tiny_hf, arch="gpt2")
    with pytest.raises(FtError) as e:
        import_gguf(other, tmp_path / "out-gpt2")
    assert (
        e.value.code == ErrorCode.MODEL_UNSUPPORTED
        and "'gpt2'" in e.value.message
        and "not supported" in e.value.message
    )

    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(FtError) as e:
        import_gguf(not_gguf, tmp_path / "out-fake")
    assert e.value.code == ErrorCode.MODEL_INVALID and "fake.gguf" in e.value.message

    good = write_gguf(tmp_path / "good.gguf", tiny_hf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(FtError) as e:
        import_gguf(cut, tmp_path / "out-cut")
    assert e.value.code == ErrorCode.MODEL_INVALID and "truncated" in e.value.message
