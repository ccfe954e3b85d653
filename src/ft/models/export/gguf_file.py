"""Write a fused model as a GGUF file llama.cpp loads, and read one back for checks.

Layout facts (each checked by tests against llama.cpp itself, see tests/test_export_gguf.py and
tests/test_export_archs.py):

* Tensor names come from the gguf package's own name map for the GGUF architecture written.
* llama.cpp's Llama applies RoPE to adjacent pairs; Hugging Face / mlx-lm rotate halves. llama.cpp's
  converter therefore permutes the rows of q/k inside each head (``reshape(h, 2, d/2, ...)`` then
  swap the middle axes); we write the same permutation and undo it when reading back. Qwen, Gemma and
  Phi-3 run "NeoX" RoPE (halves) in llama.cpp: their rows are written as they are.
* Mistral (sliding window aside, which llama.cpp ignores for this architecture) is written as ``llama``.
* Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp's by ``weight``: norm weights get +1.
* Llama 3.1's RoPE scaling is written as llama.cpp's converter writes it: a ``rope_freqs`` tensor of
  per-frequency divisors.
* Norm weights (1-D) stay float32, as llama.cpp's converter writes them. Quantized types are made from
  the f16 file by llama.cpp's own quantizer (:mod:`ft.models.export.llamacpp`), not here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ft.errors import ErrorCode, FtError
from ft.models.export.checks import require_architecture
from ft.models.export.gguf_vocab import read_vocab
from ft.models.gguf_import import unmapped_tensors


@dataclass(frozen=True)
class GgufArch:
    """How one mlx-lm model_type is written to GGUF."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp runs normal (adjacent-pair) RoPE for this architecture
    norm_offset: float = 0.0  # added to every RMSNorm weight (Gemma's 1 + w)


# mlx-lm model_type -> how it is written.
GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("LLAMA", permute_qk=True),
    "mistral": GgufArch("LLAMA", permute_qk=True),
    "qwen2": GgufArch("QWEN2"),
    "qwen3": GgufArch("QWEN3"),
    "gemma2": GgufArch("GEMMA2", norm_offset=1.0),
    "gemma3_text": GgufArch("GEMMA3", norm_offset=1.0),
    "phi3": GgufArch("PHI3"),
}
# Kept for callers that only need the names: model_type -> GGUF architecture string.
GGUF_ARCHITECTURES = {k: v.arch.lower() for k, v in GGUF_ARCHS.items()}

_QK = (".self_attn.q_proj.", ".self_attn.k_proj.")
_FLOAT_TYPES = ("f32", "f16", "bf16")


@dataclass
class GgufWritten:
    path: Path
    tensor_types: dict[str, int]
    tokenizer_model: str
    pre_tokenizer: str | None
    notes: list[str] = field(default_factory=list)


def _rope_kind(config: dict[str, Any]) -> str | None:
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    return None if kind in (None, "default") else str(kind)


def _unsupported(what: str) -> FtError:
    return FtError(
        ErrorCode.MODEL_UNSUPPORTED,
        f"GGUF export cannot write {what}",
        "export it with --format hf (and convert that with llama.cpp's convert_hf_to_gguf.py) or --format mlx",
    )


def gguf_problem(config: dict[str, Any], folder: Path | None = None) -> str | None:
    """Why the model (``config``, and the tokenizer in ``folder``) cannot be exported to GGUF, or None.

    Cheap (no weights, no vocabulary built): `ft train` asks before a run starts."""
    from ft.models.export.gguf_vocab import check_tokenizer

    try:
        check_architecture(config)
        if folder is not None:
            check_tokenizer(Path(folder))
    except FtError as e:
        return e.message
    return None


def check_architecture(config: dict[str, Any]) -> GgufArch:
    """How ``config``'s model is written to GGUF; FtError naming what is not supported."""
    model_type = require_architecture(config, GGUF_ARCHS, "GGUF", ("mlx", "hf", "peft"))
    spec = GGUF_ARCHS[model_type]
    kind = _rope_kind(config)
    allowed = {"llama": ("linear", "llama3"), "gemma3_text": ("linear",)}.get(
        "llama" if spec.arch == "LLAMA" else model_type, ()
    )
    if kind is not None and kind not in allowed:
        raise _unsupported(f"rope scaling of type {kind!r} for {model_type}")
    if spec.arch in ("GEMMA2", "GEMMA3"):
        _, _, head_dim = head_counts(config)
        scalar = config.get("query_pre_attn_scalar", head_dim)
        if scalar is not None and int(scalar) != head_dim:
            # llama.cpp scales queries by 1/sqrt(head_dim) except for model sizes it recognises.
            raise _unsupported(f"query_pre_attn_scalar {scalar} (≠ head_dim {head_dim}) for {model_type}")
    if spec.arch == "PHI3" and float(config.get("partial_rotary_factor") or 1.0) != 1.0:
        raise _unsupported("a partial rotary factor for phi3")
    return spec


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
    """Heads of a q/k projection whose rows must be permuted for llama.cpp (None: not one, or NeoX RoPE)."""
    if not check_architecture(config).permute_qk:
        return None
    heads, kv, _ = head_counts(config)
    if _QK[0] in hf_name:
        return heads
    if _QK[1] in hf_name:
        return kv
    return None


def _is_norm(hf_name: str) -> bool:
    return hf_name.endswith("norm.weight")


def _gguf_arch(config: dict[str, Any]) -> Any:
    import gguf

    return getattr(gguf.MODEL_ARCH, check_architecture(config).arch)


def _tensor_map(config: dict[str, Any]) -> Any:
    import gguf

    return gguf.get_tensor_name_map(_gguf_arch(config), int(config["num_hidden_layers"]))


def name_map(hf_names: Iterable[str], config: dict[str, Any]) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name; FtError listing every name without a mapping."""
    tmap = _tensor_map(config)
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
        raise unmapped_tensors(
            missing,
            f"have no GGUF name for a {config.get('model_type')} model",
            "export with --format mlx or --format hf instead",
        )
    return out


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """Llama 3.1 RoPE scaling as llama.cpp reads it: one divisor per rotated frequency (``rope_freqs``)."""
    s = config["rope_scaling"]
    _, _, head_dim = head_counts(config)
    base = float(config.get("rope_theta", 10000.0))
    factor = float(s.get("factor", 8.0))
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_hparams(w: Any, config: dict[str, Any], spec: GgufArch) -> None:
    import gguf

    heads, kv, head_dim = head_counts(config)
    hidden = int(config["hidden_size"])
    w.add_context_length(int(config.get("max_position_embeddings") or 4096))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if head_dim != hidden // heads or spec.arch in ("GEMMA2", "GEMMA3", "QWEN3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6 if spec.norm_offset else 1e-5)))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    kind = _rope_kind(config)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(config["rope_scaling"]["factor"]))
    if spec.arch == "GEMMA2":
        if config.get("attn_logit_softcapping") is not None:
            w.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        if config.get("final_logit_softcapping") is not None:
            w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        w.add_sliding_window(int(config.get("sliding_window") or 4096))
    if spec.arch == "GEMMA3":
        w.add_sliding_window(int(config.get("sliding_window") or 512))
        pattern = int(config.get("sliding_window_pattern") or 6)
        n = int(config["num_hidden_layers"])
        # mlx-lm (and transformers): every pattern-th layer is global, the others slide.
        w.add_sliding_window_pattern([(i + 1) % pattern != 0 for i in range(n)])
        w.add_rope_freq_base_swa(float(config.get("rope_local_base_freq", 10000.0)))
    if spec.arch == "PHI3":
        w.add_rope_scaling_orig_ctx_len(
            int(
                config.get("original_max_position_embeddings")
                or config.get("max_position_embeddings")
                or 4096
            )
        )
        if config.get("sliding_window"):
            w.add_sliding_window(int(config["sliding_window"]))


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
    """Write ``tensors`` (Hugging Face names -> float arrays, numpy or MLX) as a float GGUF file at ``path``.

    ``chat_template``: written as ``tokenizer.chat_template`` instead of the tokenizer folder's own (the
    template the model was tuned with, e.g. ft's tool fallback)."""
    import gguf

    spec = check_architecture(config)
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
    qtypes["bf16"] = gguf.GGMLQuantizationType.BF16
    if quant not in qtypes:
        raise FtError(
            ErrorCode.USAGE,
            f"ft writes GGUF at {', '.join(qtypes)}; {quant!r} is made by llama.cpp's quantizer from f16",
        )
    names = name_map(tensors, config)
    emb = tensors["model.embed_tokens.weight"]
    vocab_size = int(emb.shape[0])
    vocab = read_vocab(tokenizer_dir, vocab_size)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[_gguf_arch(config)])
    w.add_name(name)
    if description:
        w.add_description(description)
    _write_hparams(w, config, spec)
    w.add_vocab_size(vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    w.add_file_type({**file_types, "bf16": gguf.LlamaFileType.MOSTLY_BF16}[quant])

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
    if _rope_kind(config) == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
        counts["F32"] += 1
    total = len(names)
    for i, (hf, gname) in enumerate(names.items()):
        data = np.asarray(_to_numpy(tensors[hf]), dtype=np.float32)
        n = _qk_heads(hf, config)
        if n is not None:
            data = permute_qk(data, n)
        if spec.norm_offset and _is_norm(hf):
            data = data + np.float32(spec.norm_offset)
        kind = "f32" if data.ndim == 1 else quant
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
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF-only tensors (rope_freqs)


def read_gguf(path: Path, config: dict[str, Any]) -> GgufContents:
    """Every tensor (dequantized to float32) and the metadata of a GGUF file we wrote.

    Read with MLX's own GGUF loader (C++, independent of the gguf package that wrote the file, and
    fast: gguf.GGUFReader takes ~8 s on a 49k-token vocabulary); tensor types from the header.
    """
    import mlx.core as mx

    from ft.models.gguf_import import read_gguf_header

    spec = check_architecture(config)
    header = read_gguf_header(Path(path))
    shapes = {t.name: t for t in header.tensors}
    raw, metadata = mx.load(str(path), return_metadata=True)
    metadata = {k: (v.tolist() if isinstance(v, mx.array) else v) for k, v in metadata.items()}
    tmap = _tensor_map(config)
    reverse: dict[str, str] = {}
    for name in _all_hf_names(config):
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            reverse.setdefault(g, name)
    tensors: dict[str, Any] = {}
    types: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for gname, info in shapes.items():
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
        hf = reverse.get(gname)
        if hf is None:
            if stem == "rope_freqs":
                extra[gname] = data
                continue
            raise FtError(
                ErrorCode.EXPORT_FAILED, f"{Path(path).name}: unexpected tensor {gname} in the written file"
            )
        n = _qk_heads(hf, config)
        if n is not None:
            data = unpermute_qk(data, n)
        if spec.norm_offset and _is_norm(hf):
            data = data - np.float32(spec.norm_offset)
        tensors[hf] = data
        types[hf] = info.type_name
    return GgufContents(tensors, types, metadata, extra)


_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.qkv_proj",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "mlp.gate_up_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


_FUSED = ("self_attn.qkv_proj", "mlp.gate_up_proj")  # Phi-3's; other families have them split


def _all_hf_names(config: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    fused = check_architecture(config).arch == "PHI3"
    modules = [m for m in _MODULES if (m in _FUSED) == fused or m.endswith("norm") or m.endswith("o_proj")]
    modules += [m for m in _MODULES if m == "mlp.down_proj" and m not in modules]
    for i in range(int(config["num_hidden_layers"])):
        for m in modules:
            names += [f"model.layers.{i}.{m}.weight", f"model.layers.{i}.{m}.bias"]
    return names
