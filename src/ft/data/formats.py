"""Record formats: detect the format of every record and normalize it to chat messages.

Supported shapes (detected per record, so one file may mix them):

* chat        ``{"messages"|"conversations": [{"role": ..., "content": ...}, ...]}``, with OpenAI tool
              use: assistant ``tool_calls``, ``tool`` messages and a ``tools`` list
* sharegpt    ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``, with
              LLaMA-Factory's ``function_call``/``observation`` turns and ``tools`` column
* alpaca      ``{"instruction": ..., "input": ..., "output": ...}``
* completions ``{"prompt": ..., "completion": ...}``
* text        ``{"text": ...}``  (no chat template; every token is trained)
* paired      ``{"prompt": ..., "chosen": ..., "rejected": ...}`` for DPO/ORPO: the prompt a string or
              messages; chosen/rejected strings (one assistant reply), assistant messages (tool calls
              and results included), or whole conversations whose leading messages are the prompt
              (then ``prompt`` may be left out). Normalized to the chosen conversation (``messages``)
              and the rejected one (``rejected``), both starting with the same ``prompt_len`` messages.

Every format may carry ``label`` (bool, or "desirable"/"undesirable") and ``system``; any other
field is kept as metadata. Problems raise :class:`~ft.data.validate.RecordError` with a reason code.

Normalized messages are OpenAI-shaped dicts, exactly what a chat template receives:

* ``{"role": "system"|"user", "content": str}``
* ``{"role": "assistant", "content": str}``, or with tool calls
  ``{"role": "assistant", "content": str | None, "tool_calls": [call, ...]}`` where ``content`` is
  ``None`` when the turn only calls tools, and each call is
  ``{"id": str (only when given), "type": "function", "function": {"name": str, "arguments": dict}}``.
  ``arguments`` is always a JSON object (a dict): given as a JSON string it is parsed. Templates print it
  with ``tojson`` (Qwen2.5, Llama 3.1, Mistral) or as-is when it is a string (Qwen3, Hermes); a dict
  renders the same in all of them, which is also the form transformers documents.
* ``{"role": "tool", "content": str, "tool_call_id": str (when given), "name": str (when given)}``;
  a tool result that is a JSON value rather than a string is stored as its JSON text.

Plain messages carry exactly ``role`` and ``content`` (no ``tool_calls`` key), so they render as before.
Tool definitions (``Example.tools``) are OpenAI function tools ``{"type": "function", "function":
{"name", "description", "parameters"}}``; a bare ``{"name", ...}`` (LLaMA-Factory) is wrapped that way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ft.data.validate import Reason, RecordError
from ft.errors import ErrorCode, FtError


class Format(StrEnum):
    CHAT = "chat"
    SHAREGPT = "sharegpt"
    ALPACA = "alpaca"
    COMPLETIONS = "completions"
    TEXT = "text"
    PAIRED = "paired"


FORMAT_CHOICES = ("auto", *(f.value for f in Format))
UNKNOWN_TOOL_CHOICES = ("warn", "error")

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"
_CALL = "function_call"  # ShareGPT (LLaMA-Factory): an assistant turn whose value is the call(s) as JSON
# Role spellings accepted in both chat and ShareGPT records, mapped to the chat roles.
_ROLE_ALIASES = {
    "system": SYSTEM,
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "chatgpt": ASSISTANT,
    "tool": TOOL,
    "function": TOOL,  # OpenAI's legacy function-result role
    "observation": TOOL,  # LLaMA-Factory
    "function_call": _CALL,
}
_FIELDS: dict[Format, tuple[str, ...]] = {
    Format.CHAT: ("messages", "conversations"),
    Format.SHAREGPT: ("conversations", "messages"),
    Format.ALPACA: ("instruction", "input", "output"),
    Format.COMPLETIONS: ("prompt", "completion"),
    Format.TEXT: ("text",),
    Format.PAIRED: ("prompt", "chosen", "rejected"),
}
_COMMON = ("label", "system", "tools")
_DESIRABLE = {"desirable": 1, "undesirable": 0, "true": 1, "false": 0, "1": 1, "0": 0, "yes": 1, "no": 0}

Message = dict[str, Any]  # a normalized OpenAI-shaped message (see the module docstring)
Tool = dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass(slots=True)
class Example:
    """One valid record, normalized: chat messages (or plain text), a label and leftover fields.

    ``tools``: the tool definitions the conversation is rendered with (the record's own ``tools``,
    else the dataset-level list, else None). ``warnings``: tool defects tolerated by the options
    (a call to a tool not in the list under ``unknown_tool="warn"``).
    """

    fmt: Format
    messages: tuple[Message, ...] | None
    text: str | None
    label: int  # 1 desirable, 0 undesirable, -1 unlabelled
    meta: dict[str, Any] | None = None
    tools: tuple[Tool, ...] | None = None
    warnings: tuple[RecordError, ...] = ()
    rejected: tuple[Message, ...] | None = None
    """Paired records: the rejected conversation (``messages`` is the chosen one)."""
    prompt_len: int | None = None
    """Paired records: how many leading messages are the prompt both sides share."""

    @property
    def turns(self) -> int:
        """Non-system messages (1 for plain text)."""
        if self.messages is None:
            return 1
        return sum(1 for m in self.messages if m["role"] != SYSTEM)

    @property
    def tool_calls(self) -> int:
        """Tool calls made by the assistant in this conversation."""
        return sum(len(m.get("tool_calls") or ()) for m in self.messages or ())

    @property
    def uses_tools(self) -> bool:
        """True when the conversation has tool definitions, tool calls or tool results."""
        return self.tools is not None or (self.messages is not None and not is_plain(self.messages))

    def content_key(self) -> bytes:
        """Digest of the content used for exact-duplicate removal (both sides of a pair)."""
        if self.rejected is not None:
            return _digest((*(self.messages or ()), *self.rejected), None, self.tools)
        return _digest(self.messages, self.text, self.tools)

    def prompt_key(self) -> bytes:
        """Digest of everything before the last assistant turn: the 'prompt' of the contamination check.

        A pair's prompt is its ``prompt_len`` shared messages, so both sides land in the same split."""
        if self.messages is None:
            return _digest(None, self.text, None)
        if self.prompt_len is not None:
            return _digest(self.messages[: self.prompt_len], None, self.tools)
        last = max(i for i, m in enumerate(self.messages) if m["role"] == ASSISTANT)
        return _digest(self.messages[:last], None, self.tools)


def is_plain(messages: Sequence[Message]) -> bool:
    """True when every message is a plain ``{"role", "content"}`` turn (no tool calls or results)."""
    return all(len(m) == 2 and m["role"] != TOOL for m in messages)


def _digest(messages: Sequence[Message] | None, text: str | None, tools: Sequence[Tool] | None) -> bytes:
    if messages is not None:
        # A plain turn by role and content; a turn with tool calls or a tool result by all its fields.
        data = "\x1e".join(
            f"{m['role']}\x1f{m['content']}" if len(m) == 2 else f"{m['role']}\x1f{m!r}" for m in messages
        )
        if tools:
            data += "\x1dtools" + _tools_text(tools)
    else:
        data = "\x00text\x00" + (text or "")
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=16).digest()


_last_tools: tuple[Any, str] = (None, "")


def _tools_text(tools: Sequence[Tool]) -> str:
    """The tool list as text for the digests; the last one is remembered (both keys of a record, and
    every record of a dataset-level list, use the same object)."""
    global _last_tools
    last = _last_tools
    if last[0] is not tools:
        last = _last_tools = (tools, repr(tools))
    return last[1]


def detect_format(obj: dict[str, Any]) -> Format:
    """The format of one record, from its fields; raises missing_field when none fits."""
    # Tables (CSV, Parquet) hold the union of every record's columns: an empty cell is no field.
    present = {k for k, v in obj.items() if v is not None and v != ""}
    # A pair with one empty side is still a pair (reported as empty_side); a table row of another format
    # has both cells empty.
    if "chosen" in obj and "rejected" in obj and ({"chosen", "rejected"} & present):
        return Format.PAIRED
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


def normalize(
    obj: Any,
    fmt: Format | None = None,
    *,
    tools: Sequence[Tool] | None = None,
    unknown_tool: str = "warn",
) -> Example:
    """Validate one raw record and turn it into an :class:`Example` (``fmt=None`` = detect).

    ``tools``: dataset-level tool definitions (see :func:`load_tools`), used by records without their
    own ``tools``. ``unknown_tool``: a call to a tool missing from the definitions is a warning
    (``"warn"``, the record is kept) or an ``unknown_tool`` rejection (``"error"``).
    """
    if not isinstance(obj, dict):
        raise RecordError(Reason.NOT_AN_OBJECT, f"record is a {_type_name(obj)}, not an object")
    fmt = fmt or detect_format(obj)
    label = parse_label(obj.get("label"))
    system = _optional_str(obj, "system")
    rejected: list[Message] | None = None
    prompt_len: int | None = None
    if fmt is Format.PAIRED:
        prompt, chosen, rejected = _pair(obj)
        messages = prompt + chosen
        rejected = prompt + rejected
        prompt_len = len(prompt)
        label = 1
    elif fmt in (Format.CHAT, Format.SHAREGPT):
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
        messages = [{"role": USER, "content": user}, {"role": ASSISTANT, "content": output}]
    elif fmt is Format.COMPLETIONS:
        messages = [
            {"role": USER, "content": _required_str(obj, "prompt", fmt)},
            {"role": ASSISTANT, "content": _required_str(obj, "completion", fmt)},
        ]
    else:
        text = _required_str(obj, "text", fmt)
        return Example(fmt, None, text, label, _meta(obj, fmt))
    has_system = system is not None and bool(system.strip())
    if has_system:
        messages.insert(0, {"role": SYSTEM, "content": system})
        if rejected is not None:
            rejected.insert(0, {"role": SYSTEM, "content": system})
            prompt_len = (prompt_len or 0) + 1
    own = obj.get("tools")
    record_tools = _record_tools(own) if own is not None and own != "" else None
    if record_tools is None and tools:
        record_tools = tuple(tools)
    check_conversation(messages, has_system_field=has_system)
    warnings = check_tool_names(messages, record_tools, unknown_tool) if record_tools else ()
    if rejected is not None:
        check_conversation(rejected, has_system_field=has_system)
        if record_tools:
            warnings += check_tool_names(rejected, record_tools, unknown_tool)
        return Example(
            fmt,
            tuple(messages),
            None,
            label,
            _meta(obj, fmt),
            record_tools,
            warnings,
            tuple(rejected),
            prompt_len,
        )
    return Example(fmt, tuple(messages), None, label, _meta(obj, fmt), record_tools, warnings)


def _pair(obj: dict[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen reply, rejected reply) of a paired record, as normalized messages."""
    raw_prompt = obj.get("prompt")
    if raw_prompt is None or raw_prompt == "":
        prompt: list[Message] | None = None
    elif isinstance(raw_prompt, str):
        prompt = [{"role": USER, "content": raw_prompt}]
    else:
        prompt = _chat_messages(raw_prompt, "prompt", Format.CHAT)
    sides: dict[str, tuple[list[Message] | None, list[Message]]] = {}
    for key in ("chosen", "rejected"):
        raw = obj.get(key)
        if raw is None or (
            isinstance(raw, str | list) and not (raw.strip() if isinstance(raw, str) else raw)
        ):
            raise RecordError(Reason.EMPTY_SIDE, f"'{key}' is empty")
        if isinstance(raw, str):
            sides[key] = (None, [{"role": ASSISTANT, "content": raw}])
            continue
        if isinstance(raw, dict):
            raw = [raw]
        try:
            msgs = _chat_messages(raw, key, Format.CHAT)
        except RecordError as e:
            if e.reason is Reason.EMPTY_CONTENT:
                raise RecordError(Reason.EMPTY_SIDE, f"'{key}': {e.message}") from None
            raise
        # Starting with the assistant: the reply (turns after it included). Otherwise a whole conversation,
        # whose prompt is everything up to and including its last user turn.
        last_user = (
            -1
            if msgs[0]["role"] == ASSISTANT
            else max((i for i, m in enumerate(msgs) if m["role"] in (USER, SYSTEM)), default=-1)
        )
        own_prompt = msgs[: last_user + 1] if last_user >= 0 else None
        reply = msgs[last_user + 1 :]
        if not reply or not any(m["role"] == ASSISTANT for m in reply):
            raise RecordError(Reason.EMPTY_SIDE, f"'{key}' has no assistant reply after its prompt")
        sides[key] = (own_prompt, reply)
    (pc, chosen), (pr, rejected) = sides["chosen"], sides["rejected"]
    for key, own in (("chosen", pc), ("rejected", pr)):
        if own is not None and prompt is not None and own != prompt:
            raise RecordError(
                Reason.PROMPT_MISMATCH, f"'{key}' starts with a conversation that differs from 'prompt'"
            )
    if prompt is None:
        if pc is None or pr is None:
            raise RecordError(
                Reason.MISSING_FIELD, "a pair needs 'prompt' (or chosen and rejected as whole conversations)"
            )
        if pc != pr:
            raise RecordError(
                Reason.PROMPT_MISMATCH, "'chosen' and 'rejected' start with different prompt messages"
            )
        prompt = pc
    if chosen == rejected:
        raise RecordError(Reason.IDENTICAL_PAIR, "'chosen' and 'rejected' are identical")
    return prompt, chosen, rejected


def check_conversation(messages: Sequence[Message], has_system_field: bool = False) -> None:
    """Order rules: optional system first, then user -> assistant -> user ..., at least one assistant turn.

    An assistant turn with ``tool_calls`` is followed by its tool results (or ends the conversation),
    and tool results are followed by more results, by the assistant, or end the conversation. A result's
    ``tool_call_id``, when given, must name a call of the assistant turn before it (when those carry ids).
    """
    # What may come next: a user turn, an assistant turn, results of calls, or results/assistant.
    expect = USER
    calls_seen = False
    open_ids: set[str] = set()  # ids of the calls the current tool results answer
    for i, m in enumerate(messages):
        role = m["role"]
        if role == SYSTEM:
            if i == 0:
                continue
            why = (
                "the record has a 'system' field and also a system message"
                if has_system_field
                else (f"message {i + 1} is a system message; a system message may only come first")
            )
            raise RecordError(Reason.SYSTEM_NOT_FIRST, why)
        if role == TOOL:
            if expect not in (_RESULTS, _AFTER_RESULTS):
                if not calls_seen:
                    raise RecordError(
                        Reason.TOOL_RESULT_BEFORE_CALL,
                        f"message {i + 1} is a tool result, but no assistant turn before it called a tool",
                    )
                raise RecordError(
                    Reason.UNMATCHED_TOOL_RESULT,
                    f"message {i + 1} is a tool result, but message {i} ({messages[i - 1]['role']}) "
                    "made no tool call",
                )
            call_id = m.get("tool_call_id")
            if call_id is not None and open_ids and call_id not in open_ids:
                raise RecordError(
                    Reason.UNMATCHED_TOOL_RESULT,
                    f"message {i + 1} answers tool_call_id {call_id!r}, which no call of the assistant "
                    f"turn before it has (its calls: {', '.join(sorted(open_ids))})",
                )
            expect = _AFTER_RESULTS
            continue
        if expect == _RESULTS:
            raise RecordError(
                Reason.NOT_ALTERNATING,
                f"message {i + 1} is a{'n' if role == ASSISTANT else ''} {role} turn, but the tool calls "
                f"of message {i} have no results (tool messages) before it",
            )
        if role == USER and expect != USER:
            why = (
                f"message {i + 1} is a user turn right after tool results; the assistant answers them first"
                if expect == _AFTER_RESULTS
                else f"message {i + 1} is a second user turn in a row"
            )
            raise RecordError(Reason.NOT_ALTERNATING, why)
        if role == ASSISTANT and expect == USER:
            raise RecordError(
                Reason.NOT_ALTERNATING,
                f"message {i + 1} is an assistant turn but a user turn was expected"
                + (
                    " (the conversation must start with the user)"
                    if i == int(messages[0]["role"] == SYSTEM)
                    else ""
                ),
            )
        if role == ASSISTANT and "tool_calls" in m:
            calls_seen = True
            open_ids = {c["id"] for c in m["tool_calls"] if "id" in c}
            expect = _RESULTS
        else:
            expect = ASSISTANT if role == USER else USER
    if not any(m["role"] == ASSISTANT for m in messages):
        raise RecordError(Reason.NO_ASSISTANT_TURN, "the conversation has no assistant turn to train on")


_RESULTS, _AFTER_RESULTS = "results", "results or assistant"


def check_tool_names(
    messages: Sequence[Message], tools: Sequence[Tool], unknown_tool: str = "warn"
) -> tuple[RecordError, ...]:
    """Calls to tools missing from ``tools``: raised (``"error"``) or returned as warnings (``"warn"``)."""
    names = {t["function"]["name"] for t in tools}
    out: list[RecordError] = []
    for i, m in enumerate(messages):
        for k, call in enumerate(m.get("tool_calls") or ()):
            name = call["function"]["name"]
            if name not in names:
                err = RecordError(
                    Reason.UNKNOWN_TOOL,
                    f"message {i + 1} calls {name!r} (tool_calls[{k}]), which is not among the "
                    f"{len(names)} tools defined ({', '.join(sorted(names)[:6])}"
                    + (", ..." if len(names) > 6 else "")
                    + ")",
                )
                if unknown_tool == "error":
                    raise err
                out.append(err)
    return tuple(out)


def load_tools(path: str | Path) -> tuple[Tool, ...]:
    """A dataset-level tools file: a JSON list of tools (OpenAI or bare function form) or ``{"tools": [...]}``.

    Raises FtError (naming the file and the tool) when it cannot be used.
    """
    p = Path(path).expanduser()
    hint = 'a JSON list such as [{"type": "function", "function": {"name": "...", "parameters": {...}}}]'
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FtError(ErrorCode.USAGE, f"tools file {p} does not exist", hint) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FtError(ErrorCode.DATA_INVALID, f"cannot read tools file {p}: {e}", hint) from None
    except ValueError as e:
        raise FtError(ErrorCode.DATA_INVALID, f"tools file {p} is not valid JSON: {e}", hint) from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    try:
        tools = _record_tools(data, where=str(p))
    except RecordError as e:
        raise FtError(ErrorCode.DATA_INVALID, e.message, hint) from None
    if not tools:
        raise FtError(ErrorCode.DATA_INVALID, f"tools file {p} lists no tools", hint)
    return tools


def _record_tools(value: Any, where: str = "tools") -> tuple[Tool, ...]:
    value = _maybe_json_list(value)
    if not isinstance(value, list):
        raise RecordError(Reason.INVALID_TOOLS, f"{where} is a {_type_name(value)}, not a list of tools")
    out: list[Tool] = []
    for k, t in enumerate(value):
        at = f"{where}[{k}]" if where == "tools" else f"{where}: tools[{k}]"
        if not isinstance(t, dict):
            raise RecordError(Reason.INVALID_TOOLS, f"{at} is a {_type_name(t)}, not an object")
        if t.get("type", "function") != "function":
            raise RecordError(Reason.INVALID_TOOLS, f"{at} has type {t.get('type')!r}; only 'function' tools")
        fn = t.get("function") if "function" in t else t
        if not isinstance(fn, dict):
            raise RecordError(Reason.INVALID_TOOLS, f"{at}.function is a {_type_name(fn)}, not an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RecordError(Reason.INVALID_TOOLS, f"{at} has no function name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RecordError(
                Reason.INVALID_TOOLS,
                f"{at} ({name}): parameters is a {_type_name(params)}, not a JSON schema",
            )
        if "function" in t and t.get("type") == "function":
            out.append(t)
        else:
            fn = {k: v for k, v in fn.items() if k != "type"} if fn is t else fn
            out.append({"type": "function", "function": fn})
    return tuple(out)


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
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(Reason.WRONG_TYPE, f"{key}[{i}] is a {_type_name(m)}, not an object")
        role = m.get(role_key)
        if role is None:
            raise RecordError(Reason.MISSING_FIELD, f"{key}[{i}] has no '{role_key}'")
        if not isinstance(role, str):
            raise RecordError(
                Reason.WRONG_TYPE, f"{key}[{i}].{role_key} is a {_type_name(role)}, not a string"
            )
        canon = _ROLE_ALIASES.get(role) or _ROLE_ALIASES.get(role.strip().lower())
        if canon is None:
            raise RecordError(
                Reason.UNKNOWN_ROLE,
                f"{key}[{i}].{role_key} is {role!r}; expected "
                + (
                    "system, human, gpt, function_call or observation"
                    if fmt is Format.SHAREGPT
                    else "system, user, assistant or tool"
                ),
            )
        raw = m.get(content_key)
        if canon == ASSISTANT and (m.get("tool_calls") or m.get("function_call")):
            calls = m.get("tool_calls") or [m["function_call"]]  # OpenAI's legacy single function_call
            text = None if raw is None else _content_text(raw, f"{key}[{i}].{content_key}")
            out.append(
                {
                    "role": ASSISTANT,
                    "content": text if text and text.strip() else None,
                    "tool_calls": _tool_calls(calls, f"{key}[{i}]"),
                }
            )
            continue
        if canon == _CALL:
            out.append(
                {
                    "role": ASSISTANT,
                    "content": None,
                    "tool_calls": _sharegpt_calls(raw, f"{key}[{i}]", content_key),
                }
            )
            continue
        if raw is None:
            raise RecordError(Reason.MISSING_FIELD, f"{key}[{i}] has no '{content_key}'")
        if canon == TOOL:
            out.append(_tool_result(m, raw, f"{key}[{i}]", content_key))
            continue
        content = _content_text(raw, f"{key}[{i}].{content_key}")
        if not content.strip():
            raise RecordError(Reason.EMPTY_CONTENT, f"{key}[{i}] ({canon}) has empty content")
        out.append({"role": canon, "content": content})
    return out


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tool calls (or bare ``{"name", "arguments"}`` objects) in the normalized form."""
    value = _maybe_json_list(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(
            Reason.INVALID_TOOL_CALL, f"{where}.tool_calls is a {_type_name(value)}, not a list of calls"
        )
    calls = []
    for k, c in enumerate(value):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(c, dict):
            raise RecordError(Reason.INVALID_TOOL_CALL, f"{at} is a {_type_name(c)}, not an object")
        if c.get("type", "function") != "function":
            raise RecordError(
                Reason.INVALID_TOOL_CALL, f"{at} has type {c.get('type')!r}; expected 'function'"
            )
        fn = c["function"] if "function" in c else c
        if not isinstance(fn, dict):
            raise RecordError(Reason.INVALID_TOOL_CALL, f"{at}.function is a {_type_name(fn)}, not an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RecordError(Reason.INVALID_TOOL_CALL, f"{at} has no function name")
        args = fn["arguments"] if "arguments" in fn else fn.get("parameters")
        call: dict[str, Any] = {
            "type": "function",
            "function": {"name": name, "arguments": _arguments(args, f"{at} ({name})")},
        }
        cid = c.get("id")
        if cid is not None and cid != "":
            if not isinstance(cid, str | int) or isinstance(cid, bool):
                raise RecordError(Reason.INVALID_TOOL_CALL, f"{at}.id is a {_type_name(cid)}, not a string")
            call = {"id": str(cid), **call}
        calls.append(call)
    if not calls:
        raise RecordError(Reason.INVALID_TOOL_CALL, f"{where}.tool_calls is empty")
    return calls


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """A call's arguments as a dict: an object as is, a JSON string parsed (``""``/missing = no arguments)."""
    if isinstance(value, dict):
        return value
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        try:
            parsed = json.loads(text)
            if isinstance(parsed, str) and parsed.lstrip().startswith("{"):
                parsed = json.loads(parsed)  # a JSON string encoded twice
        except ValueError as e:
            raise RecordError(
                Reason.INVALID_ARGUMENTS, f"{where}: arguments are not valid JSON ({e}): {_short(value, 80)}"
            ) from None
        if isinstance(parsed, dict):
            return parsed
        value = parsed
    raise RecordError(
        Reason.INVALID_ARGUMENTS, f"{where}: arguments are a JSON {_type_name(value)}, not an object"
    )


def _sharegpt_calls(raw: Any, where: str, content_key: str) -> list[dict[str, Any]]:
    """A LLaMA-Factory ``function_call`` turn: ``{"name", "arguments"}`` (or a list of them) as JSON text."""
    if raw is None:
        raise RecordError(Reason.MISSING_FIELD, f"{where} has no '{content_key}'")
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise RecordError(
                Reason.INVALID_TOOL_CALL,
                f"{where} (function_call) is not valid JSON ({e}): {_short(raw, 80)}",
            ) from None
    return _tool_calls(value, where)


def _tool_result(m: dict[str, Any], raw: Any, where: str, content_key: str) -> Message:
    """A tool message: its content as text (a JSON value as its JSON text), tool_call_id and name when given."""
    if isinstance(raw, str):
        content = raw
    else:
        try:
            content = _content_text(raw, f"{where}.{content_key}")
        except RecordError:
            content = json.dumps(raw, ensure_ascii=False)
    msg: Message = {"role": TOOL, "content": content}
    cid = m.get("tool_call_id")
    if cid is not None and cid != "":
        if not isinstance(cid, str | int) or isinstance(cid, bool):
            raise RecordError(Reason.WRONG_TYPE, f"{where}.tool_call_id is a {_type_name(cid)}, not a string")
        msg["tool_call_id"] = str(cid)
    name = m.get("name")
    if name is not None and name != "":
        if not isinstance(name, str):
            raise RecordError(Reason.WRONG_TYPE, f"{where}.name is a {_type_name(name)}, not a string")
        msg["name"] = name
    return msg


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
            return "".join(texts)
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
