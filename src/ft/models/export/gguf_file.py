"""Write a fused Llama/Mistral model as a GGUF file llama.cpp loads, and read one back for checks.

Layout facts (each checked by tests against llama.cpp itself, see tests/test_export_gguf.py):

* Tensor names come from the gguf package's own name map for the LLAMA architecture.
* llama.cpp's Llama applies RoPE to adjacent pairs; Hugging Face / mlx-lm rotate halves. llama.cpp's
  converter therefore permutes the rows of q/k inside each head (``reshape(h, 2, d/2, ...)`` then
  swap the middle axes); we write the same permutation and undo it when reading back.
* Mistral (sliding window aside, which llama.cpp ignores for this architecture) is written as ``llama``.
* Norm weights (1-D) stay float32, as llama.cpp's converter writes them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ft.errors import ErrorCode, FtError
from ft.models.export.gguf_vocab import read_vocab

# mlx-lm model_type -> GGUF architecture written.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama"}

_QK = (".self_attn.q_proj.", ".self_attn.k_proj.")


@dataclass
class GgufWritten:
    path: Path
    tensor_types: dict[str, int]
    tokenizer_model: str
    pre_tokenizer: str | None
    notes: list[str] = field(default_factory=list)


def check_architecture(config: dict[str, Any]) -> str:
    """The GGUF architecture for ``config``; FtError naming what is not supported."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))} models; this one is {model_type!r}",
            "export it with --format mlx, --format hf or --format peft instead",
        )
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default", "linear"):
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"GGUF export does not write rope scaling of type {kind!r} yet",
            "export it with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    return GGUF_ARCHITECTURES[model_type]


def _qtypes() -> dict[str, Any]:
    import gguf

    T = gguf.GGMLQuantizationType
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}


def _file_type(quant: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
    }[quant]


def head_counts(config: dict[str, Any]) -> tuple[int, int, int]:
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return heads, kv, head_dim


def permute_qk(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face (rotate-half) rows -> llama.cpp (adjacent pairs) rows, per head."""
    shape = x.shape
    return x.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    shape = x.shape
    return x.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _qk_heads(hf_name: str, config: dict[str, Any]) -> int | None:
    heads, kv, _ = head_counts(config)
    if _QK[0] in hf_name:
        return heads
    if _QK[1] in hf_name:
        return kv
    return None


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> str:
    """The GGUF tensor type a tensor gets for the requested precision."""
    if len(shape) == 1:
        return "f32"
    if quant in ("q8_0", "q4_0"):
        if shape[-1] % 32:  # quantized blocks run along rows of 32 values
            return "f16"
        if quant == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
            return "q8_0"  # as llama.cpp's quantizer does: the vocabulary matrices keep more bits
    return quant


def name_map(hf_names: Iterable[str], n_layers: int) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name; FtError listing every name without a mapping."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    out, missing = {}, []
    for name in hf_names:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            missing.append(name)
        else:
            out[name] = mapped
    if missing:
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{len(missing)} tensors have no GGUF name for a llama model: "
            + ", ".join(missing[:6])
            + (" ..." if len(missing) > 6 else ""),
            "export with --format mlx or --format hf instead",
        )
    return out


def write_gguf(
    path: Path,
    tensors: dict[str, Any],
    config: dict[str, Any],
    tokenizer_dir: Path,
    quant: str,
    *,
    name: str,
    description: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    chat_template: str | None = None,
) -> GgufWritten:
    """Write ``tensors`` (Hugging Face names -> float arrays, numpy or MLX) as a GGUF file at ``path``.

    ``chat_template``: written as ``tokenizer.chat_template`` instead of the tokenizer folder's own (the
    template the model was tuned with, e.g. ft's tool fallback)."""
    import gguf

    arch = check_architecture(config)
    qtypes = _qtypes()
    if quant not in qtypes:
        raise FtError(ErrorCode.USAGE, f"unknown GGUF precision {quant!r}", f"use one of {', '.join(qtypes)}")
    heads, kv, head_dim = head_counts(config)
    hidden = int(config["hidden_size"])
    n_layers = int(config["num_hidden_layers"])
    names = name_map(tensors, n_layers)
    emb = tensors["model.embed_tokens.weight"]
    vocab_size = int(emb.shape[0])
    vocab = read_vocab(tokenizer_dir, vocab_size)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    if description:
        w.add_description(description)
    w.add_context_length(int(config.get("max_position_embeddings") or 4096))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_vocab_size(vocab_size)
    w.add_file_type(_file_type(quant))
    if quant in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(w, quiet=True)

    counts: Counter[str] = Counter()
    total = len(names)
    for i, (hf, gname) in enumerate(names.items()):
        data = np.asarray(_to_numpy(tensors[hf]), dtype=np.float32)
        n = _qk_heads(hf, config)
        if n is not None:
            data = permute_qk(data, n)
        kind = tensor_type(gname, data.shape, quant)
        packed = gguf.quants.quantize(data, qtypes[kind]) if kind != "f32" else data
        w.add_tensor(gname, packed, raw_dtype=qtypes[kind])
        counts[kind.upper()] += 1
        if progress:
            progress(i + 1, total)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GgufWritten(Path(path), dict(counts), vocab.model, vocab.pre, vocab.notes)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    import mlx.core as mx

    return np.array(x.astype(mx.float32))


@dataclass
class GgufContents:
    """A GGUF file read back: float32 tensors under Hugging Face names (q/k rows un-permuted)."""

    tensors: dict[str, np.ndarray]
    tensor_types: dict[str, str]  # Hugging Face name -> GGUF type name
    metadata: dict[str, Any]


def read_gguf(path: Path, config: dict[str, Any]) -> GgufContents:
    """Every tensor (dequantized to float32) and the metadata of a GGUF file we wrote.

    Read with MLX's own GGUF loader (C++, independent of the gguf package that wrote the file, and
    fast: gguf.GGUFReader takes ~8 s on a 49k-token vocabulary); tensor types from the header.
    """
    import mlx.core as mx

    from ft.models.gguf_import import read_gguf_header

    header = read_gguf_header(Path(path))
    shapes = {t.name: t for t in header.tensors}
    raw, metadata = mx.load(str(path), return_metadata=True)
    metadata = {k: (v.tolist() if isinstance(v, mx.array) else v) for k, v in metadata.items()}
    reverse = {g: hf for hf, g in name_map(_all_hf_names(config), int(config["num_hidden_layers"])).items()}
    tensors, types = {}, {}
    for gname, info in shapes.items():
        hf = reverse.get(gname)
        if hf is None:
            raise FtError(
                ErrorCode.EXPORT_FAILED, f"{Path(path).name}: unexpected tensor {gname} in the written file"
            )
        stem = gname[: -len(".weight")] if gname.endswith(".weight") else gname
        if f"{stem}.scales" in raw:
            bits = 8 if info.type_name == "Q8_0" else 4
            w = mx.dequantize(
                raw[gname],
                raw[f"{stem}.scales"].astype(mx.float32),
                raw[f"{stem}.biases"].astype(mx.float32),
                group_size=32,
                bits=bits,
            )
        else:
            w = raw[gname]
        data = np.array(w.astype(mx.float32))
        n = _qk_heads(hf, config)
        if n is not None:
            data = unpermute_qk(data, n)
        tensors[hf] = data
        types[hf] = info.type_name
    return GgufContents(tensors, types, metadata)


def _all_hf_names(config: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(int(config["num_hidden_layers"])):
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ):
            names += [f"model.layers.{i}.{m}.weight", f"model.layers.{i}.{m}.bias"]
    return names
