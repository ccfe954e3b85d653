"""GGUF export checked by the real client: llama.cpp (llama-cpp-python) loads what `ft export` writes.

Known answers: llama.cpp's tokenizer must give our token ids; its greedy continuations must be the
MLX model's; a model tuned to answer a question only it can know must answer it in llama.cpp (and the
base export must not); a random Mistral-style model with a SentencePiece tokenizer must give the same
logits in llama.cpp as in MLX.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import export_tune as tune

if os.environ.get("CI"):  # CI installs the test extra: a missing llama.cpp there is a failure, not a skip
    import llama_cpp
else:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is a test dependency (pip install -e '.[test]')"
    )

pytestmark = pytest.mark.e2e

STRINGS = [
    "Hello world",
    "  two  spaces and\ttab\n\nnewlines\n",
    "12345 + 678 = 13023; 3.14159",
    "naïve café — “quotes” 日本語 😀 Ünïcödé",
    "I'm sure they'll've done it, isn't it?",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "def f(x):\n    return x**2  # square",
    "http://example.com/path?q=1&r=2",
]
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]
N_TOKENS = 16


@pytest.fixture(scope="module")
def workspace(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    ckpt = tune.cached_checkpoint(smollm2_dir, Path(request.config.rootpath) / ".pytest_cache" / "ft-export")
    return tune.make_workspace(tmp_path_factory.mktemp("export-gguf") / "ws", smollm2_dir, ckpt)


def _export(ws_root: Path, *args: str) -> dict:
    """`ft export ... --json` through the real CLI entry point; returns the parsed result."""
    import contextlib
    import io

    from ft.cli.app import run

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = run(["--workspace", str(ws_root), "export", *args, "--json"])
    out = json.loads(buf.getvalue())
    assert code == 0, out
    return out


@pytest.fixture(scope="module")
def exports(workspace: Path) -> dict[str, dict]:
    return {
        "f16": _export(workspace, "--format", "gguf", "--quant", "f16"),
        "q8_0": _export(workspace, "--format", "gguf", "--quant", "q8_0"),
    }


@pytest.fixture(scope="module")
def llm_f16(exports):
    """One llama.cpp instance on the f16 export, shared (loading is cheap, but generation state is not reused)."""
    return _llama(exports["f16"]["main_file"])


@pytest.fixture(scope="module")
def mlx_tuned(workspace: Path):
    """The adapter-on-base MLX model (not fused) and its tokenizer: the reference llama.cpp must match."""
    from ft.models.loading import load
    from ft.services.export import apply_checkpoint, resolve_checkpoint
    from ft.workspace import Workspace

    ckpt = resolve_checkpoint(Workspace(workspace), None, "best")
    model, tok = load(ckpt.base_model_dir, dequantize=True, dtype="float32")
    apply_checkpoint(model, ckpt)
    return model, tok


def _llama(path: str, **kw):
    return llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, seed=0, verbose=False, **kw)


_GREEDY_CACHE: dict[tuple[int, tuple[int, ...], int], list[int]] = {}


def _mlx_greedy(model, ids: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    key = (id(model), tuple(ids), n)
    if key not in _GREEDY_CACHE:
        _GREEDY_CACHE[key] = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]
    return _GREEDY_CACHE[key]


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def _agreement(llm, model, tok) -> tuple[int, int, list[str]]:
    agree = total = 0
    report = []
    prompts = [*PROMPTS, tune.chat_prompt(tok)]
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=False)
        want, got = _mlx_greedy(model, ids, N_TOKENS), _llama_greedy(llm, ids, N_TOKENS)
        same = sum(a == b for a, b in zip(want, got, strict=True))
        agree, total = agree + same, total + N_TOKENS
        report.append(
            f"{same}/{N_TOKENS} {p[-30:]!r}: mlx {tok.decode(want)!r} llama.cpp {tok.decode(got)!r}"
        )
    return agree, total, report


def test_f16_gguf_loads_tokenizes_and_generates_like_mlx(llm_f16, mlx_tuned):
    model, tok = mlx_tuned
    llm = llm_f16
    for s in STRINGS:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(
            s, add_special_tokens=False
        ), s
    agree, total, report = _agreement(llm, model, tok)
    assert agree == total, "\n".join(report)


def test_q8_0_gguf_generates_like_mlx_on_at_least_90_percent_of_tokens(exports, mlx_tuned):
    """Token by token: at each step of MLX's greedy continuation, llama.cpp picks the same next token.

    Scored with the same prefix at every step (teacher forcing): in free-running generation one
    near-tie flipped by 8-bit rounding changes every later token, which says nothing about the others.
    """
    model, tok = mlx_tuned
    result = exports["q8_0"]
    assert result["quant"] == "q8_0"
    llm = _llama(result["main_file"], logits_all=True)
    for s in STRINGS:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(
            s, add_special_tokens=False
        ), s
    agree = total = 0
    report = []
    for p in [*PROMPTS, tune.chat_prompt(tok)]:
        ids = tok.encode(p, add_special_tokens=False)
        want = _mlx_greedy(model, ids, N_TOKENS)
        llm.reset()
        llm.eval(ids + want[:-1])
        got = np.asarray(llm.scores[len(ids) - 1 : len(ids) - 1 + N_TOKENS]).argmax(-1).tolist()
        same = sum(a == b for a, b in zip(want, got, strict=True))
        agree, total = agree + same, total + N_TOKENS
        report.append(f"{same}/{N_TOKENS} {p[-30:]!r}: mlx {tok.decode(want)!r}")
    assert agree >= 0.9 * total, "\n".join(report)
    assert {c["name"] for c in result["checks"]} >= {"fuse", "tensors", "tokenizer", "logits", "tune kept"}


def test_chat_completion_uses_the_embedded_chat_template(llm_f16, mlx_tuned):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, tok = mlx_tuned
    llm = llm_f16
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tok.chat_template
    messages = [{"role": "user", "content": tune.QUESTION}]
    # llama-cpp-python's chat completion formats with the GGUF's template: same prompt text as ours.
    formatted = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>")(
        messages=messages
    )
    assert formatted.prompt == tune.chat_prompt(tok)
    reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=20)
    text = reply["choices"][0]["message"]["content"]
    assert "PINEAPPLE-42" in text, text  # only the tuned model, prompted through the template, knows it
    assert "<|im_end|>" not in text  # stopped at the template's end-of-turn token


def test_tuned_gguf_differs_from_base_and_carries_the_tune(exports, mlx_tuned, llm_f16):
    """Against the base model's own GGUF (the embedded file the run was trained on)."""
    from ft.models.embedded import embedded_gguf_path
    from ft.models.export.gguf_file import read_gguf

    _, tok = mlx_tuned
    tuned = exports["f16"]
    base_file = str(embedded_gguf_path())
    config = json.loads(
        (Path(tuned["path"]).parents[3] / "models" / tune.BASE_NAME / "config.json").read_text()
    )
    t_back, b_back = read_gguf(Path(tuned["main_file"]), config), read_gguf(Path(base_file), config)
    # Adapted projections moved; gate_proj (not adapted) is the base's weight up to f16 rounding.
    same = np.abs(
        t_back.tensors["model.layers.5.mlp.gate_proj.weight"]
        - b_back.tensors["model.layers.5.mlp.gate_proj.weight"]
    ).max()
    assert same < 2e-3, same
    for name in ("model.layers.5.self_attn.v_proj.weight", "model.layers.20.mlp.down_proj.weight"):
        moved = np.abs(t_back.tensors[name] - b_back.tensors[name]).max()
        assert moved > 5 * same and moved > 5e-3, (name, moved, same)

    prompt = tok.encode(tune.chat_prompt(tok), add_special_tokens=False)
    answer = tok.encode(tune.ANSWER, add_special_tokens=False)

    def answer_loss(path: str) -> float:
        llm = _llama(path, logits_all=True)
        llm.reset()
        llm.eval(prompt + answer)
        logits = np.asarray(llm.scores[: len(prompt) + len(answer)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = np.array(answer)
        rows = np.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
        return float(-logp[rows, targets].mean())

    tuned_loss, base_loss = answer_loss(tuned["main_file"]), answer_loss(base_file)
    assert tuned_loss < 0.5 < base_loss, (tuned_loss, base_loss)
    said = tok.decode(_llama_greedy(llm_f16, prompt, N_TOKENS))
    base_said = tok.decode(_llama_greedy(_llama(base_file), prompt, N_TOKENS))
    assert "PINEAPPLE-42" in said and "PINEAPPLE" not in base_said, (said, base_said)


def test_modelfile_beside_the_gguf(exports):
    folder = Path(exports["f16"]["path"])
    text = (folder / "Modelfile").read_text()
    gguf_name = Path(exports["f16"]["main_file"]).name
    assert f"FROM ./{gguf_name}" in text and (folder / gguf_name).is_file()
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM "You are a helpful AI assistant named SmolLM, trained by Hugging Face"' in text


def test_export_is_recorded_with_sha256s(exports, workspace: Path):
    import hashlib

    from ft.workspace import Workspace

    result = exports["f16"]
    row = Workspace(workspace).registry().get("exports", id=result["id"])
    assert row is not None and row["run_id"] == "run-tune"
    folder = Path(result["path"])
    for name, sha in row["meta"]["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha
    manifest = json.loads((folder / "ft_export.json").read_text())
    assert manifest["files"] == row["meta"]["sha256"] and manifest["base_quantized"] is True
    assert folder == Path(workspace) / "runs" / "run-tune" / "export" / "gguf-f16"


# --------------------------------------------------------------------- SentencePiece (Mistral-style)
CHAT_INST = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def mistral_ws(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A workspace holding a random 2-layer Mistral (GQA 4:2 heads) with a trained SentencePiece BPE tokenizer."""
    import random

    import mlx.core as mx
    import sentencepiece as spm
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import llama
    from transformers import AutoTokenizer

    from ft.services.project import init_workspace

    root = tmp_path_factory.mktemp("export-spm")
    random.seed(0)
    words = "the quick brown fox jumps over lazy dog hello world model export llama mistral café naïve 2024 data".split()
    (root / "corpus.txt").write_text(
        "\n".join(" ".join(random.choice(words) for _ in range(12)) for _ in range(2000))
    )
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "spm"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    src = root / "src"
    src.mkdir()
    (root / "spm.model").rename(src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "chat_template": CHAT_INST,
            }
        )
    )
    init_workspace(root / "ws")
    folder = root / "ws" / "models" / "tiny-mistral"
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(folder))  # tokenizer.json, no tokenizer.model
    config = {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": 400,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Larger-than-default weights so the logits spread out and a wrong q/k layout cannot hide.
    model.update(tree_map(lambda v: v * 3.0 if v.ndim == 2 else v, model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    # A second copy that also ships the SentencePiece file: scores then come from it, not from merge ranks.
    with_spm = folder.with_name("tiny-mistral-spm")
    shutil.copytree(folder, with_spm)
    shutil.copy2(src / "tokenizer.model", with_spm / "tokenizer.model")
    return root / "ws", folder


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-mistral-spm"])
def test_sentencepiece_mistral_gguf_matches_mlx_in_llama_cpp(mistral_ws, name):
    from transformers import AutoTokenizer

    from ft.models.export import verify
    from ft.models.loading import load
    from ft.services.export import export
    from ft.workspace import Workspace

    ws_root, folder = mistral_ws
    folder = folder.with_name(name)
    result = export(Workspace(ws_root), model=name, fmt="gguf", quant="f32")
    llm = _llama(result.main_file, logits_all=True)
    assert llm.metadata["tokenizer.ggml.model"] == "llama"
    scores_from = "tokenizer.model" if name.endswith("-spm") else "merge ranks"
    assert any(scores_from in c.detail for c in result.checks if c.name == "tokenizer")
    assert llm.metadata["tokenizer.chat_template"] == CHAT_INST
    hf = AutoTokenizer.from_pretrained(str(folder))
    # Not tested: text that starts with a space. llama.cpp always adds SentencePiece's dummy-prefix space;
    # Hugging Face's Metaspace skips it when the text already starts with one (a known difference of the
    # two tokenizers for every SentencePiece model, not of the file).
    for s in [
        "hello world",
        "the quick brown fox",
        "café naïve 2024",
        "Zebra unseen words!",
        "lazy  dog\nmodel  x",
    ]:
        ours = hf.encode(s)  # with BOS, as the tokenizer config says
        assert llm.tokenize(s.encode(), add_bos=True) == ours, (s, hf.convert_ids_to_tokens(ours))
    model, _ = load(folder, dtype="float32")
    ids = hf.encode("the quick brown fox jumps over the lazy dog")
    want = verify.logits(model, [ids])[0]
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - want).max() < 1e-3 * max(1.0, float(np.abs(want).max())), np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


# ------------------------------------------------------------- byte-level BPE pre-tokenizer names
_DIGITS_BYTELEVEL = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def _split_bytelevel(regex: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_bpe_pre_tokenizer_names_tokenize_like_llama_cpp(pre, smollm2_dir: Path, tmp_path: Path):
    """SmolLM2's vocabulary behind each pre-tokenizer ft can name: llama.cpp must split text identically.

    (This vocabulary has no multi-digit tokens, so digit grouping -- smollm vs gpt-2, qwen2 vs llama-bpe --
    cannot show here; contractions, case, punctuation, CR/LF and whitespace runs do.)
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer

    from ft.models.export.gguf_file import write_gguf
    from ft.models.export.gguf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT

    structure = {
        "smollm": _DIGITS_BYTELEVEL,
        "llama-bpe": _split_bytelevel(_LLAMA3_SPLIT),
        "qwen2": _split_bytelevel(_QWEN2_SPLIT),
    }[pre]
    folder = tmp_path / "tok"
    folder.mkdir()
    tok_json = json.loads((smollm2_dir / "tokenizer.json").read_text())
    tok_json["pre_tokenizer"] = structure
    (folder / "tokenizer.json").write_text(json.dumps(tok_json))
    shutil.copy2(smollm2_dir / "tokenizer_config.json", folder / "tokenizer_config.json")
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 128,
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    written = write_gguf(
        tmp_path / "m.gguf", dict(tree_flatten(model.parameters())), config, folder, "f32", name="t"
    )
    assert written.pre_tokenizer == pre
    mx.clear_cache()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = [
        *STRINGS,
        "1234567 apples cost 89.99 dollars",
        "Line one\r\n\r\nline two   \n\n\tend",
        "don'T SHOUT'S",
    ]
    for s in texts:
        assert (
            llm.tokenize(s.encode(), add_bos=False, special=True)
            == ours.encode(s, add_special_tokens=False).ids
        ), s
