"""Tool calls in model output: which style a chat template uses, and parsing generated text back into calls."""

from __future__ import annotations

HERMES, MISTRAL, LLAMA3, FALLBACK = "hermes", "mistral", "llama3", "fallback"
STYLES = (HERMES, MISTRAL, LLAMA3, FALLBACK)


def detect_style(source: str) -> str:
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<tool_call>" in source:
        return HERMES
    if '"parameters": ' in source or "<|python_tag|>" in source:
        return LLAMA3
    return FALLBACK
