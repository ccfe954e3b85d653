"""Exported model files: GGUF (llama.cpp, Ollama), mlx-lm folders, Hugging Face folders, PEFT adapters.

This package knows file formats only. It takes a fused MLX model (float weights) or adapter
tensors, writes them, and reads them back for verification. Picking the run and checkpoint,
fusing adapters, verifying logits and recording the export live in :mod:`ft.services.export`.
"""

from __future__ import annotations

FORMATS = ("gguf", "mlx", "hf", "peft")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
# llama.cpp's k-quants exist only as GGUF; mlx folders quantize with MLX (q8_0 / q4_0: 8 / 4 bits, groups of 32).
GGUF_ONLY_QUANTS = ("q6_k", "q5_k_m", "q4_k_m")
DEFAULT_QUANT = {"gguf": "q4_k_m", "mlx": "f16", "hf": "f16", "peft": "f32"}
# From least to most precise: what a failed tune-survival check suggests instead.
PRECISION_ORDER = ("q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "bf16", "f16", "f32")

# Files a model folder may carry that describe its tokenizer and generation defaults; copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
