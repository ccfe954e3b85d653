"""Import a GGUF file (llama.cpp's format) into an mlx-lm loadable folder.

The folder holds ``config.json``, ``model.safetensors`` (weights kept quantized exactly as the file
stores them: ``mx.load`` turns Q4_0/Q4_1/Q8_0 blocks into MLX affine-quantized triples), and a
``tokenizer.json`` + ``tokenizer_config.json`` rebuilt from the GGUF metadata (with the chat
template), built with ``tokenizers`` only -- no torch.

Two facts this module relies on, both checked by tests against known answers:

* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that its interleaved RoPE
  works; mlx-lm's Llama uses the Hugging Face (rotate-half) layout, so we apply the inverse
  permutation. On the embedded SmolLM2 this takes the perplexity of a fixed English paragraph from
  ~41 (rows as stored) to ~11, and turns empty chat replies into correct answers.
* The per-tensor quantization differs inside one file (SmolLM2's Q4_1 file stores the embedding as
  Q8_0), so ``config.json`` names every module whose bits/group differ from the default.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ft.errors import ErrorCode, FtError
from ft.workspace.atomic import atomic_dir, sha256_file

log = logging.getLogger(__name__)

# Bump when the produced folder changes (tests cache imports keyed on the importer's source too).
IMPORTER_VERSION = 1

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PROVENANCE_FILE = "ft_import.json"

# GGUF architecture -> mlx-lm model_type. Both use mlx_lm.models.llama.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "mistral"}

# Tensor types mx.load reads faithfully; (bits, group_size) for the quantized ones.
QUANT_TYPES = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32)}
FLOAT_TYPES = {"F32", "F16"}
SUPPORTED_TENSOR_TYPES = FLOAT_TYPES | set(QUANT_TYPES)

# ggml type ids (ggml.h) -> names, enough to name anything we refuse.
_GGML_TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}

# GGUF tensor names -> Hugging Face / mlx-lm module paths.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# --------------------------------------------------------------------------------------------
# A small GGUF header reader: metadata and tensor directory, without loading any tensor data.
# (gguf.GGUFReader parses every array element into numpy views: ~3.5 s on a 49k-token vocab.)
# --------------------------------------------------------------------------------------------

_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_KEPT = 64  # longer arrays (the vocabulary) are skipped; mx.load returns them in full


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (input) dimension


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[GgufTensor] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.type_name for t in self.tensors))


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _read_str(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALAR:
        return _read(f, _SCALAR[vtype])
    if vtype == _STRING:
        return _read_str(f)
    if vtype == _ARRAY:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if count <= _MAX_ARRAY_KEPT:
            return [_read_value(f, etype) for _ in range(count)]
        if etype in _SCALAR:  # skip without parsing
            f.seek(count * struct.calcsize(_SCALAR[etype]), 1)
        else:
            for _ in range(count):
                _read_value(f, etype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_header(path: Path) -> GgufHeader:
    """Metadata (long arrays left as None) and the tensor directory of a GGUF file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise FtError(
                    ErrorCode.MODEL_INVALID,
                    f"{path} is not a GGUF file (no GGUF magic at its start)",
                    "pass a .gguf file written by llama.cpp, or a Hugging Face/MLX model folder",
                )
            version = _read(f, "<I")
            if version < 2:
                raise FtError(
                    ErrorCode.MODEL_UNSUPPORTED,
                    f"{path} is GGUF version {version}; ft reads versions 2 and 3",
                    "re-convert the model with a current llama.cpp",
                )
            n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
            header = GgufHeader(version=version)
            for _ in range(n_kv):
                key = _read_str(f)
                header.metadata[key] = _read_value(f, _read(f, "<I"))
            for _ in range(n_tensors):
                name = _read_str(f)
                n_dims = _read(f, "<I")
                shape = tuple(_read(f, "<Q") for _ in range(n_dims))
                type_id = _read(f, "<I")
                _read(f, "<Q")  # data offset
                header.tensors.append(
                    GgufTensor(name, _GGML_TYPE_NAMES.get(type_id, f"type#{type_id}"), shape)
                )
            return header
    except (EOFError, ValueError, struct.error) as e:
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{path} is truncated or corrupt ({e or 'unexpected end of file'})",
            "download the file again",
        ) from e
    except OSError as e:
        raise FtError(ErrorCode.NOT_FOUND, f"cannot read {path}: {e.strerror}") from e


# --------------------------------------------------------------------------------------------
# Checks: architecture, tensor types, tensor names -- all problems reported at once.
# --------------------------------------------------------------------------------------------


def _hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None when unknown)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) >= 4 and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}." + ".".join(parts[3:])
    if parts[0] in _GLOBAL_NAMES and len(parts) >= 2:
        return f"{_GLOBAL_NAMES[parts[0]]}." + ".".join(parts[1:])
    return None


def check_gguf(path: Path, header: GgufHeader | None = None) -> GgufHeader:
    """Raise a clear FtError unless ft can import this GGUF faithfully."""
    header = header or read_gguf_header(path)
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{Path(path).name}: GGUF architecture {arch or '(none)'!r} is not supported yet "
            f"(ft imports: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})",
            "pull the original Hugging Face repository instead: ft models pull <org>/<repo>",
        )
    bad_types = Counter(t.type_name for t in header.tensors if t.type_name not in SUPPORTED_TENSOR_TYPES)
    if bad_types:
        example = next(t.name for t in header.tensors if t.type_name not in SUPPORTED_TENSOR_TYPES)
        listed = ", ".join(f"{n} ({c} tensors)" for n, c in sorted(bad_types.items()))
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{Path(path).name}: tensor type {listed} cannot be imported (e.g. {example}); "
            f"ft imports {', '.join(sorted(SUPPORTED_TENSOR_TYPES))}",
            "use a Q8_0, Q4_0, Q4_1 or F16 GGUF of this model, or pull its Hugging Face repository",
        )
    if any(t.name == "rope_freqs.weight" for t in header.tensors):
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"{Path(path).name}: Llama-3 style rope frequency scaling (rope_freqs) is not supported in GGUF import yet",
            "pull the original Hugging Face repository instead",
        )
    unknown = [t.name for t in header.tensors if _hf_name(t.name) is None]
    if unknown:
        raise unmapped_tensors(
            unknown,
            f"of {Path(path).name} have names a {arch} model does not have",
            "this GGUF is not a plain llama/mistral model; pull the Hugging Face repository instead",
        )
    return header


def unmapped_tensors(names: list[str], what: str, hint: str) -> FtError:
    """The error for tensors whose names have no counterpart between GGUF and Hugging Face (import and
    export alike): how many, and the first few by name."""
    shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
    return FtError(ErrorCode.MODEL_UNSUPPORTED, f"{len(names)} tensors {what}: {shown}", hint)


# --------------------------------------------------------------------------------------------
# Config, weights, tokenizer
# --------------------------------------------------------------------------------------------


def _meta(header: GgufHeader, key: str, default: Any = None) -> Any:
    return header.metadata.get(f"{header.architecture}.{key}", default)


def _required(header: GgufHeader, key: str) -> Any:
    value = _meta(header, key)
    if value is None:
        raise FtError(ErrorCode.MODEL_INVALID, f"GGUF metadata lacks {header.architecture}.{key}")
    return value


def _module_quantization(header: GgufHeader) -> dict[str, tuple[int, int] | None]:
    """HF module path -> (bits, group_size) for quantized 2-D weights, None for float ones."""
    out: dict[str, tuple[int, int] | None] = {}
    for t in header.tensors:
        if not t.name.endswith(".weight") or len(t.shape) != 2:
            continue
        module = _hf_name(t.name)[: -len(".weight")]  # type: ignore[index]
        out[module] = QUANT_TYPES.get(t.type_name)
    return out


def build_config(header: GgufHeader, tokens_count: int | None = None) -> dict[str, Any]:
    """An mlx-lm / Hugging Face style config.json for a llama-family GGUF."""
    arch = header.architecture
    n_heads = int(_required(header, "attention.head_count"))
    hidden = int(_required(header, "embedding_length"))
    names = {t.name for t in header.tensors}
    vocab: Any = _meta(header, "vocab_size") or tokens_count
    emb = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if vocab is None and emb is not None:
        vocab = emb.shape[1]
    config: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if arch == "mistral" else "LlamaForCausalLM"],
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "hidden_size": hidden,
        "intermediate_size": int(_required(header, "feed_forward_length")),
        "num_hidden_layers": int(_required(header, "block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_meta(header, "attention.head_count_kv", n_heads)),
        "head_dim": int(_meta(header, "attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(_meta(header, "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_meta(header, "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_meta(header, "context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "torch_dtype": "float16",
    }
    scaling = _meta(header, "rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(_meta(header, "rope.scaling.factor", 1.0)),
        }
    elif scaling not in (None, "none"):
        raise FtError(
            ErrorCode.MODEL_UNSUPPORTED,
            f"GGUF rope scaling {scaling!r} is not supported in GGUF import yet",
            "pull the original Hugging Face repository instead",
        )
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = header.metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[name] = int(value)

    quant = _module_quantization(header)
    used = Counter(q for q in quant.values() if q is not None)
    if used:
        (bits, group), _ = used.most_common(1)[0]
        q: dict[str, Any] = {"group_size": group, "bits": bits}
        for module, mq in sorted(quant.items()):
            if mq is None:
                q[module] = False  # a float module inside a quantized model
            elif mq != (bits, group):
                q[module] = {"group_size": mq[1], "bits": mq[0]}
        config["quantization"] = q
        config["quantization_config"] = q  # the key Hugging Face tools look for
    return config


def _unpermute_rows(x: Any, n_heads: int) -> Any:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves).

    llama.cpp writes ``w.reshape(h, 2, d/2, ...).swapaxes(1, 2)``; this is its inverse. Rows are the
    output features, and quantization groups run along the input features, so the packed weight,
    its scales and biases are permuted alike and stay quantized exactly as stored.
    """
    shape = x.shape
    return x.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _scalar(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def build_tokenizer(metadata: dict[str, Any], architecture: str) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config dict) from GGUF metadata, without torch."""
    from tokenizers import processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise FtError(
            ErrorCode.MODEL_INVALID, "the GGUF carries no tokenizer (tokenizer.ggml.tokens missing)"
        )
    tdict: dict[str, Any] = {
        "tokenizer_type": metadata.get("tokenizer.ggml.model"),
        "pre_tokenizer_type": metadata.get("tokenizer.ggml.pre"),
        "tokens": list(tokens),
    }
    for src, dst in (("merges", "merges"), ("scores", "scores"), ("token_type", "token_type")):
        if f"tokenizer.ggml.{src}" in metadata:
            tdict[dst] = _scalar(metadata[f"tokenizer.ggml.{src}"])
    if "tokenizer.ggml.add_space_prefix" in metadata:
        tdict["add_prefix_space"] = bool(_scalar(metadata["tokenizer.ggml.add_space_prefix"]))
    try:
        backend, _ = convert_gguf_tokenizer(architecture, tdict)
    except ValueError as e:
        raise FtError(ErrorCode.MODEL_UNSUPPORTED, f"cannot rebuild the GGUF tokenizer: {e}") from e

    def token(key: str) -> str | None:
        idx = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[int(_scalar(idx))] if idx is not None else None

    default_bos = tdict["tokenizer_type"] == "llama"  # llama.cpp's default for sentencepiece vocabularies
    add_bos = bool(_scalar(metadata.get("tokenizer.ggml.add_bos_token", default_bos)))
    add_eos = bool(_scalar(metadata.get("tokenizer.ggml.add_eos_token", False)))
    bos, eos = token("bos_token_id"), token("eos_token_id")
    # The fast tokenizer adds BOS/EOS through its post-processor; state it explicitly so any loader agrees.
    single, special = ["$A:0"], []
    if add_bos and bos is not None:
        single.insert(0, f"{bos}:0")
        special.append((bos, int(_scalar(metadata["tokenizer.ggml.bos_token_id"]))))
    if add_eos and eos is not None:
        single.append(f"{eos}:0")
        if eos != bos:
            special.append((eos, int(_scalar(metadata["tokenizer.ggml.eos_token_id"]))))
    if special:
        pair = single + [s.replace(":0", ":1").replace("$A", "$B") for s in single]
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=special
        )
    tconfig: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(metadata.get(f"{architecture}.context_length", 4096))),
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        value = token(key)
        if value is not None:
            tconfig[name] = value
    template = metadata.get("tokenizer.chat_template")
    if template:
        tconfig["chat_template"] = template
    return backend, tconfig


def _chmod_like_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders; a model folder should get the user's usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


@dataclass(frozen=True)
class GgufImport:
    """What an import produced (also written to ``ft_import.json`` in the folder)."""

    path: Path
    architecture: str
    tensor_types: dict[str, int]
    quantization: dict[str, Any] | None
    parameters: int
    source_sha256: str


def import_gguf(gguf_path: Path | str, out_dir: Path | str, *, overwrite: bool = False) -> GgufImport:
    """Turn a llama/mistral GGUF into an mlx-lm loadable folder at ``out_dir`` (written atomically).

    Raises FtError when the file is not supported (architecture, tensor type, names) or corrupt, and
    when ``out_dir`` exists and ``overwrite`` is False.
    """
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FtError(ErrorCode.NOT_FOUND, f"no GGUF file at {gguf_path}")
    header = check_gguf(gguf_path)
    if out_dir.exists() and not overwrite:
        raise FtError(
            ErrorCode.ALREADY_EXISTS, f"{out_dir} already exists", "remove it first or choose another name"
        )

    log.info(
        "importing %s (%s)", gguf_path.name, ", ".join(f"{k}x{v}" for k, v in header.type_counts().items())
    )
    weights, metadata = mx.load(str(gguf_path), return_metadata=True)
    config = build_config(header, tokens_count=len(metadata.get("tokenizer.ggml.tokens") or []) or None)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    out: dict[str, Any] = {}
    parameters = 0
    quant = _module_quantization(header)
    for name, value in weights.items():
        hf = _hf_name(name)
        if hf is None:  # check_gguf already refused unknown names; mx.load adds .scales/.biases
            raise FtError(ErrorCode.MODEL_INVALID, f"unexpected tensor {name} in {gguf_path.name}")
        for proj, n in heads.items():
            if f".self_attn.{proj}." in hf:
                value = _unpermute_rows(value, n)
        out[hf] = value
    for t in header.tensors:
        n = 1
        for d in t.shape:
            n *= d
        parameters += n
    # Sanity: every quantized module has its triple, and shapes agree with the GGUF directory.
    problems = []
    for module, q in quant.items():
        if q is not None and not all(f"{module}.{s}" in out for s in ("weight", "scales", "biases")):
            problems.append(f"{module}: quantized weight without scales/biases")
    if problems:
        raise FtError(ErrorCode.MODEL_INVALID, f"{gguf_path.name}: " + "; ".join(problems))

    backend, tconfig = build_tokenizer(metadata, header.architecture)
    sha = sha256_file(gguf_path)
    provenance = {
        "importer_version": IMPORTER_VERSION,
        "source_file": gguf_path.name,
        "source_sha256": sha,
        "architecture": header.architecture,
        "tensor_types": header.type_counts(),
        "parameters": parameters,
        "qk_rows": "llama.cpp interleaved order converted to Hugging Face rotate-half order",
        "general_name": header.metadata.get("general.name"),
    }
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            _chmod_like_umask(tmp)
            mx.save_safetensors(str(tmp / WEIGHTS_FILE), out, metadata={"format": "mlx"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            backend.save(str(tmp / TOKENIZER_FILE))
            (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tconfig, indent=2, ensure_ascii=False) + "\n")
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    except FileExistsError as e:
        raise FtError(ErrorCode.ALREADY_EXISTS, f"{out_dir} already exists", "remove it first") from e
    return GgufImport(
        path=out_dir,
        architecture=header.architecture,
        tensor_types=header.type_counts(),
        quantization=config.get("quantization"),
        parameters=parameters,
        source_sha256=sha,
    )
