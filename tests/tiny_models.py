"""A tiny random-weight Llama written as a Hugging Face layout folder (config, safetensors, tokenizer)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
] * 20


def build_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer trained on a few sentences; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            }
        )
    )
    return tok.get_vocab_size()


def write_tiny_llama(
    folder: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, dtype: str = "float32"
) -> dict:
    """Write a 2-layer random Llama in Hugging Face layout into ``folder``; returns its config."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": dtype,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    return config


def logits_of(folder: Path, text: str = "Paris is the capital of France") -> list[float]:
    """Last-position logits of the model in ``folder`` (a float32 list), loaded through ft."""
    import mlx.core as mx

    from ft.models.loading import load

    model, tok = load(folder, dequantize=False)
    out = model(mx.array([tok.encode(text)]))[0, -1].astype(mx.float32)
    return out.tolist()


# ----------------------------------------------------------------------------- one tiny model per family
# Each family: the mlx-lm model_type, its config (tiny), the tokenizer kind it ships and its chat template.
_LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_PHI3_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
_INST_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

_BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
FAMILIES: dict[str, dict] = {
    "llama3": {
        "config": {
            **_BASE,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
        "tokenizer": "bpe-llama3",
        "special": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "chat": _LLAMA3_CHAT,
    },
    "mistral": {
        "config": {
            **_BASE,
            "model_type": "mistral",
            "architectures": ["MistralForCausalLM"],
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
        "tokenizer": "spm",
        "special": [],
        "bos": "<s>",
        "eos": "</s>",
        "chat": _INST_CHAT,
    },
    "qwen2": {
        "config": {
            **_BASE,
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        },
        "tokenizer": "bpe-qwen2",
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "chat": _CHATML,
    },
    "qwen3": {
        "config": {
            **_BASE,
            "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"],
            "num_key_value_heads": 2,
            "head_dim": 32,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        },
        "tokenizer": "bpe-qwen2",
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "chat": _CHATML,
    },
    "gemma2": {
        "config": {
            **_BASE,
            "model_type": "gemma2",
            "architectures": ["Gemma2ForCausalLM"],
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "sliding_window": 64,
        },
        "tokenizer": "spm-gemma",
        "special": ["<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "chat": _GEMMA_CHAT,
    },
    "gemma3": {
        "config": {
            **_BASE,
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "sliding_window": 64,
            "sliding_window_pattern": 2,
            "max_position_embeddings": 2048,
        },
        "tokenizer": "spm-gemma",
        "special": ["<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<end_of_turn>",
        "chat": _GEMMA_CHAT,
    },
    "phi3": {
        "config": {
            **_BASE,
            "model_type": "phi3",
            "architectures": ["Phi3ForCausalLM"],
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
        "tokenizer": "spm",
        # llama.cpp recognises Phi-3 by name and then needs <|endoftext|>, as real Phi-3 vocabularies have.
        "special": ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        # As in Phi-3's own tokenizer (and what llama.cpp assumes for a model named phi3): whitespace
        # after the role markers is stripped.
        "rstrip": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        "bos": "<s>",
        "eos": "<|end|>",
        "chat": _PHI3_CHAT,
    },
}

_WORDS = (
    "the quick brown fox jumps over lazy dog hello world model export llama mistral gemma qwen phi "
    "café naïve 2024 data 12 345 don't it's Paris capital France THE Quick"
).split()


def _corpus(n: int = 1500) -> list[str]:
    import random

    rnd = random.Random(0)
    return [" ".join(rnd.choice(_WORDS) for _ in range(10)) for _ in range(n)]


def _bpe_tokenizer(folder: Path, kind: str, special: list[str]) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from ft.models.export.gguf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT

    regex = _LLAMA3_SPLIT if kind == "bpe-llama3" else _QWEN2_SPLIT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(str(folder / "tokenizer.json"))


def _spm_tokenizer(folder: Path, work: Path, kind: str, family: dict) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.txt").write_text("\n".join(_corpus()))
    gemma = kind == "spm-gemma"
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"),
        model_prefix=str(work / "spm"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=0 if gemma else -1,
        eos_id=1 if gemma else 2,
        bos_id=2 if gemma else 1,
        unk_id=3 if gemma else 0,
        pad_piece="<pad>",
        bos_piece=family["bos"],
        eos_piece="<eos>" if gemma else "</s>",
        add_dummy_prefix=not gemma,
        minloglevel=2,
    )
    src = work / "src"
    src.mkdir(exist_ok=True)
    (work / "spm.model").rename(src / "tokenizer.model")
    cfg = {
        "tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer",
        "bos_token": family["bos"],
        "eos_token": "<eos>" if gemma else "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        # Llama 2 / Mistral v0.1 / Phi-3 ship the "legacy" SentencePiece normalizer: a space before the
        # text after every special token, as llama.cpp's SentencePiece tokenizer does too.
        "legacy": True,
    }
    if gemma:
        cfg["pad_token"] = "<pad>"
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = AutoTokenizer.from_pretrained(str(src))
    if family["special"]:
        from tokenizers import AddedToken

        strip = set(family.get("rstrip", ()))
        hf.add_special_tokens(
            {
                "additional_special_tokens": [
                    AddedToken(t, rstrip=t in strip, special=True, normalized=False)
                    for t in family["special"]
                ]
            }
        )
    hf.save_pretrained(str(folder))  # tokenizer.json (+ tokenizer.model for the slow class)


def write_family(
    folder: Path, family: str, *, seed: int = 0, scale: float = 3.0, overrides: dict | None = None
) -> dict:
    """A tiny random model of ``family`` (see FAMILIES) in Hugging Face layout, with its kind of tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from transformers import AutoTokenizer

    from ft.models.architectures import mlx_module_for

    spec = FAMILIES[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if spec["tokenizer"].startswith("bpe"):
        _bpe_tokenizer(folder, spec["tokenizer"], spec["special"])
    else:
        _spm_tokenizer(folder, folder.parent / f".{folder.name}-spm", spec["tokenizer"], spec)
    cfg_path = folder / "tokenizer_config.json"
    tcfg = (
        json.loads(cfg_path.read_text())
        if cfg_path.is_file()
        else {"tokenizer_class": "PreTrainedTokenizerFast"}
    )
    tcfg.update(
        {"chat_template": spec["chat"], "eos_token": spec["eos"], "clean_up_tokenization_spaces": False}
    )
    if spec["bos"]:
        tcfg["bos_token"] = spec["bos"]
    tcfg["add_bos_token"] = bool(spec["bos"])
    cfg_path.write_text(json.dumps(tcfg, indent=1))
    hf = AutoTokenizer.from_pretrained(str(folder))
    config = {**spec["config"], **(overrides or {})}
    config["vocab_size"] = len(hf)
    config["eos_token_id"] = hf.convert_tokens_to_ids(spec["eos"])
    if spec["bos"]:
        config["bos_token_id"] = hf.convert_tokens_to_ids(spec["bos"])
    module = importlib.import_module(f"mlx_lm.models.{mlx_module_for(config['model_type'])}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Larger-than-default weights so the logits spread out and a wrong layout cannot hide.
    model.update(tree_map(lambda v: v * scale if v.ndim == 2 else v, model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return config
