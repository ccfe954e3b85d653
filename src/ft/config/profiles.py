"""`ft init --profile`: each profile changes only the values that differ from the defaults."""

from __future__ import annotations

from typing import Any

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # The brief's setting: multi-turn conversations, loss on assistant turns.
    "chat": {},
    # Single-turn instruction/response pairs (alpaca-style files); short sequences, a little more lr.
    "instruction": {
        "data": {"format": "alpaca", "max_seq_length": 1024},
        "training": {"learning_rate": 2e-4},
    },
    # Code: long files, adapters on every linear layer, more rank.
    "code": {
        "lora": {"rank": 32, "alpha": 64, "target_modules": "all-linear"},
        "data": {"max_seq_length": 4096},
        "training": {"learning_rate": 2e-4},
    },
    # Tool calling (agents' data): tool definitions and results make conversations long.
    "tools": {"data": {"max_seq_length": 1024}},
    # Domain adaptation on plain text: every token is trained, labels ignored.
    "domain": {
        "lora": {"rank": 32, "alpha": 64, "target_modules": "all-linear"},
        "data": {"format": "text", "labels": "all"},
        "training": {"learning_rate": 5e-5, "epochs": 2},
    },
}

PROFILE_HELP: dict[str, str] = {
    "chat": "multi-turn conversations (the default)",
    "instruction": "single-turn instruction -> response pairs",
    "code": "source code: long sequences, adapters on all linear layers",
    "domain": "continued training on plain domain text",
    "tools": "tool-calling conversations (the sample is a note-vault assistant with five tools)",
}
