"""Record formats: detect the format of every record and normalize it to chat messages.

Supported shapes (detected per record, so one file may mix them):

* chat        ``{"messages"|"conversations": [{"role": ..., "content": ...}, ...]}``
* sharegpt    ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``
* alpaca      ``{"instruction": ..., "input": ..., "output": ...}``
* completions ``{"prompt": ..., "completion": ...}``
* text        ``{"text": ...}``  (no chat template; every token is trained)

Every format may carry ``label`` (bool, or "desirable"/"undesirable") and ``system``; any other
field is kept as metadata. Problems raise :class:`~ft.data.validate.RecordError` with a reason code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ft.data.validate import Reason, RecordError


class Format(StrEnum):
    CHAT = "chat"
    SHAREGPT = "sharegpt"
    ALPACA = "alpaca"
    COMPLETIONS = "completions"
    TEXT = "text"


FORMAT_CHOICES = ("auto", *(f.value for f in Format))

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
# Role spellings accepted in both chat and ShareGPT records, mapped to the three chat roles.
_ROLE_ALIASES = {
    "system": SYSTEM,
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "chatgpt": ASSISTANT,
}
_FIELDS: dict[Format, tuple[str, ...]] = {
    Format.CHAT: ("messages", "conversations"),
    Format.SHAREGPT: ("conversations", "messages"),
    Format.ALPACA: ("instruction", "input", "output"),
    Format.COMPLETIONS: ("prompt", "completion"),
    Format.TEXT: ("text",),
}
_COMMON = ("label", "system")
_DESIRABLE = {"desirable": 1, "undesirable": 0, "true": 1, "false": 0, "1": 1, "0": 0, "yes": 1, "no": 0}

Message = tuple[str, str]  # (role, content)


@dataclass(slots=True)
class Example:
    """One valid record, normalized: chat messages (or plain text), a label and leftover fields."""

    fmt: Format
    messages: tuple[Message, ...] | None
    text: str | None
    label: int  # 1 desirable, 0 undesirable, -1 unlabelled
    meta: dict[str, Any] | None = None

    @property
    def turns(self) -> int:
        """Non-system messages (1 for plain text)."""
        if self.messages is None:
            return 1
        return sum(1 for r, _ in self.messages if r != SYSTEM)

    def content_key(self) -> bytes:
        """Digest of the content used for exact-duplicate removal."""
        return _digest(self.messages, self.text)

    def prompt_key(self) -> bytes:
        """Digest of everything before the last assistant turn: the 'prompt' of the contamination check."""
        if self.messages is None:
            return _digest(None, self.text)
        last = max(i for i, (r, _) in enumerate(self.messages) if r == ASSISTANT)
        return _digest(self.messages[:last], None)

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]


def _digest(messages: tuple[Message, ...] | None, text: str | None) -> bytes:
    if messages is not None:
        data = "\x1e".join(f"{role}\x1f{content}" for role, content in messages)
    else:
        data = "\x00text\x00" + (text or "")
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def detect_format(obj: dict[str, Any]) -> Format:
    """The format of one record, from its fields; raises missing_field when none fits."""
    # Tables (CSV, Parquet) hold the union of every record's columns: an empty cell is no field.
    present = {k for k, v in obj.items() if v is not None and v != ""}
    for key in ("messages", "conversations"):
        if key in present:
            conv = _maybe_json_list(obj[key])
            first = next((m for m in conv if isinstance(m, dict)), None) if isinstance(conv, list) else None
            if first is not None and first.get("from") is not None and first.get("role") is None:
                return Format.SHAREGPT
            return Format.CHAT
    if "instruction" in present or "output" in present:
        return Format.ALPACA
    if "prompt" in present or "completion" in present:
        return Format.COMPLETIONS
    if "text" in present:
        return Format.TEXT
    fields = ", ".join(sorted(map(str, present))[:8]) or "none"
    raise RecordError(
        Reason.MISSING_FIELD,
        f"no known record fields (has: {fields}); expected messages/conversations, "
        "instruction+output, prompt+completion or text",
    )


def normalize(obj: Any, fmt: Format | None = None) -> Example:
    """Validate one raw record and turn it into an :class:`Example` (``fmt=None`` = detect)."""
    if not isinstance(obj, dict):
        raise RecordError(Reason.NOT_AN_OBJECT, f"record is a {_type_name(obj)}, not an object")
    fmt = fmt or detect_format(obj)
    label = parse_label(obj.get("label"))
    system = _optional_str(obj, "system")
    if fmt in (Format.CHAT, Format.SHAREGPT):
        key = next((k for k in _FIELDS[fmt] if obj.get(k) not in (None, "")), None)
        if key is None:
            raise RecordError(
                Reason.MISSING_FIELD, f"{fmt.value} record has no 'messages' or 'conversations' field"
            )
        messages = _chat_messages(obj[key], key, fmt)
    elif fmt is Format.ALPACA:
        instruction = _required_str(obj, "instruction", fmt)
        extra = _optional_str(obj, "input")
        output = _required_str(obj, "output", fmt)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [(USER, user), (ASSISTANT, output)]
    elif fmt is Format.COMPLETIONS:
        messages = [
            (USER, _required_str(obj, "prompt", fmt)),
            (ASSISTANT, _required_str(obj, "completion", fmt)),
        ]
    else:
        text = _required_str(obj, "text", fmt)
        return Example(fmt, None, text, label, _meta(obj, fmt))
    if system is not None and system.strip():
        messages.insert(0, (SYSTEM, system))
    check_conversation(messages, has_system_field=system is not None and bool(system.strip()))
    return Example(fmt, tuple(messages), None, label, _meta(obj, fmt))


def check_conversation(messages: list[Message], has_system_field: bool = False) -> None:
    """Order rules: optional system first, then user/assistant alternating, at least one assistant turn."""
    expected = USER
    for i, (role, _content) in enumerate(messages):
        if role == SYSTEM:
            if i == 0:
                continue
            why = (
                "the record has a 'system' field and also a system message"
                if has_system_field
                else (f"message {i + 1} is a system message; a system message may only come first")
            )
            raise RecordError(Reason.SYSTEM_NOT_FIRST, why)
        if role != expected:
            if role == ASSISTANT:
                why = f"message {i + 1} is an assistant turn but a user turn was expected" + (
                    " (the conversation must start with the user)"
                    if i == int(messages[0][0] == SYSTEM)
                    else ""
                )
            else:
                why = f"message {i + 1} is a second user turn in a row"
            raise RecordError(Reason.NOT_ALTERNATING, why)
        expected = ASSISTANT if role == USER else USER
    if not any(r == ASSISTANT for r, _ in messages):
        raise RecordError(Reason.NO_ASSISTANT_TURN, "the conversation has no assistant turn to train on")


def parse_label(value: Any) -> int:
    """bool, 0/1, or "desirable"/"undesirable"/"true"/"false" -> 1/0; missing -> -1."""
    if value is None or value == "":
        return -1
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in _DESIRABLE:
        return _DESIRABLE[value.strip().lower()]
    raise RecordError(
        Reason.WRONG_TYPE, f'label is {_short(value)}; expected true/false or "desirable"/"undesirable"'
    )


def _chat_messages(value: Any, key: str, fmt: Format) -> list[Message]:
    value = _maybe_json_list(value)
    if not isinstance(value, list):
        raise RecordError(Reason.WRONG_TYPE, f"'{key}' is a {_type_name(value)}, not a list of messages")
    if not value:
        raise RecordError(Reason.NO_ASSISTANT_TURN, f"'{key}' is empty")
    role_key, content_key = ("from", "value") if fmt is Format.SHAREGPT else ("role", "content")
    out: list[Message] = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise RecordError(Reason.WRONG_TYPE, f"{key}[{i - 1}] is a {_type_name(m)}, not an object")
        if m.get(role_key) is None:
            raise RecordError(Reason.MISSING_FIELD, f"{key}[{i - 1}] has no '{role_key}'")
        if m.get(content_key) is None:
            raise RecordError(Reason.MISSING_FIELD, f"{key}[{i - 1}] has no '{content_key}'")
        role = m[role_key]
        if not isinstance(role, str):
            raise RecordError(
                Reason.WRONG_TYPE, f"{key}[{i - 1}].{role_key} is a {_type_name(role)}, not a string"
            )
        canon = _ROLE_ALIASES.get(role.strip().lower())
        if canon is None:
            raise RecordError(
                Reason.UNKNOWN_ROLE,
                f"{key}[{i - 1}].{role_key} is {role!r}; expected "
                + ("system, human or gpt" if fmt is Format.SHAREGPT else "system, user or assistant"),
            )
        content = _content_text(m[content_key], f"{key}[{i - 1}].{content_key}")
        if not content.strip():
            raise RecordError(Reason.EMPTY_CONTENT, f"{key}[{i - 1}] ({canon}) has empty content")
        out.append((canon, content))
    return out


def _content_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI-style content parts: [{"type": "text", "text": "..."}]; only text parts are supported.
    if (
        isinstance(value, list)
        and value
        and all(isinstance(p, dict) and p.get("type") == "text" for p in value)
    ):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    raise RecordError(Reason.WRONG_TYPE, f"{where} is a {_type_name(value)}, not a string")


def _maybe_json_list(value: Any) -> Any:
    """CSV and Parquet cells hold conversations as JSON text; decode those."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _required_str(obj: dict[str, Any], key: str, fmt: Format) -> str:
    if key not in obj or obj[key] is None:
        raise RecordError(Reason.MISSING_FIELD, f"{fmt.value} record has no '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(Reason.WRONG_TYPE, f"'{key}' is a {_type_name(value)}, not a string")
    if not value.strip():
        raise RecordError(Reason.EMPTY_CONTENT, f"'{key}' is empty")
    return value


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(Reason.WRONG_TYPE, f"'{key}' is a {_type_name(value)}, not a string")
    return value


def _meta(obj: dict[str, Any], fmt: Format) -> dict[str, Any] | None:
    used = set(_FIELDS[fmt]) | set(_COMMON)
    extra = {str(k): v for k, v in obj.items() if k not in used and v is not None and v != ""}
    return extra or None


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(v), type(v).__name__
    )


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v, default=str, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."
