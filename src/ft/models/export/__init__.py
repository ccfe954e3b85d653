"""Exported model files: GGUF (llama.cpp, Ollama), mlx-lm folders, Hugging Face folders, PEFT adapters.

This package knows file formats only. It takes a fused MLX model (float weights) or adapter
tensors, writes them, and reads them back for verification. Picking the run and checkpoint,
fusing adapters, verifying logits and recording the export live in :mod:`ft.services.export`.
"""

from __future__ import annotations

FORMATS = ("gguf", "mlx", "hf", "peft")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")

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
