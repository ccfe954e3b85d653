"""Tool calls in model output: which style a chat template writes them in, and parsing them back.

The styles (what the model is trained to emit, so what generated text is parsed for):

* ``hermes``   Qwen2.5/Qwen3, Hermes: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one
  block per call, optionally after some text;
* ``mistral``  Mistral v0.3 and later: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}, ...]``;
* ``llama3``   Llama 3.1+: the whole reply is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``; several calls separated by ``;``);
* ``fallback`` ft's own format for templates without tool support (see :mod:`ft.data.templates`): the
  same ``<tool_call>{json}</tool_call>`` blocks as ``hermes``.

:func:`parse_tool_calls` never raises: text that does not hold a call comes back as content, and a call
that cannot be read (cut off, invalid JSON, no name) comes back as an ``error`` with the text kept in
``content``. Calls come back in ft's normalized form (``arguments`` a dict, as in :mod:`ft.data.formats`);
:func:`openai_tool_calls` turns them into the OpenAI API's form (``arguments`` a JSON string, an id each).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

HERMES, MISTRAL, LLAMA3, FALLBACK = "hermes", "mistral", "llama3", "fallback"
STYLES = (HERMES, MISTRAL, LLAMA3, FALLBACK)

# Text that opens a call in each style (a streaming server holds output back from here on).
CALL_MARKERS: dict[str, tuple[str, ...]] = {
    HERMES: ("<tool_call>",),
    FALLBACK: ("<tool_call>",),
    MISTRAL: ("[TOOL_CALLS]",),
    LLAMA3: ("<|python_tag|>", "{"),
}

_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedOutput:
    """Generated text split into its text part and its tool calls.

    ``content``: the text outside the calls, stripped (None when there is none). ``tool_calls``: the
    calls read, each ``{"type": "function", "function": {"name": str, "arguments": dict}}`` (plus
    ``"id"`` when the model wrote one). ``error``: why a call-looking part could not be read, else None.
    """

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def called(self) -> bool:
        """The output tried to call a tool (whether or not every call could be read)."""
        return bool(self.tool_calls) or self.error is not None


def detect_style(template_source: str | None) -> str:
    """The tool-call style a chat template writes (``fallback`` when it has no tool support)."""
    src = template_source or ""
    if "tool_call" not in src:
        return FALLBACK
    if "[TOOL_CALLS]" in src:
        return MISTRAL
    if "<tool_call>" in src:
        return HERMES
    if '"parameters": ' in src or "<|python_tag|>" in src:
        return LLAMA3
    return HERMES


def parse_tool_calls(text: str, style: str = "auto") -> ParsedOutput:
    """Read the tool calls out of generated ``text`` written in ``style`` (``auto``: whichever fits)."""
    if not isinstance(text, str):
        return ParsedOutput(None, [], f"not text: {type(text).__name__}")
    if style == "auto":
        for s in (HERMES, MISTRAL, LLAMA3):
            out = parse_tool_calls(text, s)
            if out.called:
                return out
        return ParsedOutput(_text(text))
    if style in (HERMES, FALLBACK):
        return _parse_blocks(text)
    if style == MISTRAL:
        return _parse_mistral(text)
    if style == LLAMA3:
        return _parse_llama3(text)
    return ParsedOutput(_text(text), [], f"unknown tool-call style {style!r}")


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls as the OpenAI API returns them: ``arguments`` as JSON text, an ``id`` on each (made up if none)."""
    return [
        {
            "id": c.get("id") or "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False),
            },
        }
        for c in calls
    ]


def _text(s: str) -> str | None:
    s = s.strip()
    return s or None


def _call(obj: Any, where: str) -> tuple[dict[str, Any] | None, str | None]:
    """One call object ``{"name", "arguments"|"parameters", "id"?}`` -> normalized call, or an error."""
    if not isinstance(obj, dict):
        return None, f"{where} is a JSON {type(obj).__name__}, not an object"
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, f"{where} has no function name"
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None, f"{where} ({name}): arguments are not valid JSON"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None, f"{where} ({name}): arguments are a JSON {type(args).__name__}, not an object"
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(obj.get("id"), str) and obj["id"]:
        call = {"id": obj["id"], **call}
    return call, None


def _json_error(body: str) -> str:
    try:
        json.loads(body)
    except ValueError as e:
        return str(e)
    return "not a call object"


def _parse_blocks(text: str) -> ParsedOutput:
    calls: list[dict[str, Any]] = []
    error = None
    kept: list[str] = []
    pos = 0
    for k, m in enumerate(_BLOCK.finditer(text)):
        body = m.group(1).strip()
        closed = bool(m.group(2))
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        call, why = _call(obj, f"tool call {k + 1}") if obj is not None else (None, None)
        if call is not None:
            kept.append(text[pos : m.start()])
            calls.append(call)
        else:
            kept.append(text[pos : m.end()])
            if error is None:
                error = why or (
                    f"tool call {k + 1} is not valid JSON ({_json_error(body)})"
                    + ("" if closed else "; it has no closing </tool_call>")
                )
        pos = m.end()
    kept.append(text[pos:])
    return ParsedOutput(_text("".join(kept)), calls, error)


def _parse_mistral(text: str) -> ParsedOutput:
    k = text.find("[TOOL_CALLS]")
    if k < 0:
        return ParsedOutput(_text(text))
    before, rest = text[:k], text[k + len("[TOOL_CALLS]") :].lstrip()
    try:
        value, end = _DECODER.raw_decode(rest)
    except ValueError as e:
        return ParsedOutput(_text(text), [], f"the calls after [TOOL_CALLS] are not valid JSON ({e})")
    items = value if isinstance(value, list) else [value]
    calls: list[Any] = []
    for i, item in enumerate(items):
        call, why = _call(item, f"tool call {i + 1}")
        if call is None:
            return ParsedOutput(_text(text), calls, why)
        calls.append(call)
    if not calls:
        return ParsedOutput(_text(text), [], "[TOOL_CALLS] holds an empty list")
    return ParsedOutput(_text(before + rest[end:]), calls)


def _parse_llama3(text: str) -> ParsedOutput:
    rest = text.strip()
    tagged = rest.startswith("<|python_tag|>")
    if tagged:
        rest = rest[len("<|python_tag|>") :].lstrip()
    if not rest.startswith("{"):
        return ParsedOutput(
            _text(text), [], "<|python_tag|> is not followed by a JSON call" if tagged else None
        )
    calls: list[Any] = []
    while rest:
        try:
            value, end = _DECODER.raw_decode(rest)
        except ValueError as e:
            return ParsedOutput(_text(text), calls, f"the call is not valid JSON ({e})")
        if (
            not isinstance(value, dict)
            or "name" not in value
            or not ({"parameters", "arguments"} & value.keys())
        ):
            if calls or tagged:
                return ParsedOutput(
                    _text(text), calls, f"tool call {len(calls) + 1} has no name and parameters"
                )
            return ParsedOutput(_text(text))  # a JSON answer, not a call
        call, why = _call(value, f"tool call {len(calls) + 1}")
        if call is None:
            return ParsedOutput(_text(text), calls, why)
        calls.append(call)
        rest = rest[end:].lstrip().lstrip(";").lstrip()
        if rest and not rest.startswith("{"):
            return ParsedOutput(_text(rest), calls)
    return ParsedOutput(None, calls)
