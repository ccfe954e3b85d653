"""Reason codes for rejected records, the rejection record itself, and the --max-bad threshold.

Every record that does not become a training example is accounted for with one :class:`Reason`
and its location (``file:line`` or ``file row N``). Reasons split in two groups:

* *bad* records (invalid JSON, wrong fields, broken conversations, ...) count against ``--max-bad``;
* *filtered* records (exact duplicates, over-length examples) follow their own policy (dedupe,
  ``--on-long``) and are counted and reported, but do not make preparation fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ft.errors import ErrorCode, FtError


class Reason(StrEnum):
    """Why a record was rejected; the value is what rejected.jsonl and --json carry."""

    INVALID_JSON = "invalid_json"
    INVALID_CSV = "invalid_csv"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_ROLE = "unknown_role"
    EMPTY_CONTENT = "empty_content"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    NOT_ALTERNATING = "not_alternating"
    SYSTEM_NOT_FIRST = "system_not_first"
    INVALID_TOOLS = "invalid_tools"
    INVALID_TOOL_CALL = "invalid_tool_call"
    INVALID_ARGUMENTS = "invalid_arguments"
    UNKNOWN_TOOL = "unknown_tool"
    UNMATCHED_TOOL_RESULT = "unmatched_tool_result"
    TOOL_RESULT_BEFORE_CALL = "tool_result_before_call"
    TEMPLATE_ERROR = "template_error"
    BAD_ENCODING = "bad_encoding"
    IDENTICAL_PAIR = "identical_pair"
    EMPTY_SIDE = "empty_side"
    PROMPT_MISMATCH = "prompt_mismatch"
    DUPLICATE = "duplicate"
    CONFLICTING_LABEL = "conflicting_label"
    TOO_LONG = "too_long"


# Dropped by policy (dedupe, --on-long), reported, but not counted against --max-bad.
FILTER_REASONS = frozenset({Reason.DUPLICATE, Reason.CONFLICTING_LABEL, Reason.TOO_LONG})
BAD_REASONS = frozenset(set(Reason) - FILTER_REASONS)

HINTS: dict[Reason, str] = {
    Reason.INVALID_JSON: "each line must be one complete JSON object",
    Reason.INVALID_CSV: "check quoting in that row",
    Reason.NOT_AN_OBJECT: "each record must be a JSON object ({...}), not a list, string or number",
    Reason.MISSING_FIELD: "a record needs messages/conversations, instruction+output, prompt+completion or text",
    Reason.WRONG_TYPE: "check the field's type (content must be a string, messages a list, label a bool)",
    Reason.UNKNOWN_ROLE: "roles are system, user, assistant and tool (ShareGPT: system, human, gpt, "
    "function_call, observation)",
    Reason.EMPTY_CONTENT: "remove the empty turn or fill it in",
    Reason.NO_ASSISTANT_TURN: "a training example needs at least one assistant reply",
    Reason.NOT_ALTERNATING: "turns must go user, assistant, user, assistant ... (after an optional system message); "
    "an assistant's tool calls are followed by their tool results, then the assistant again",
    Reason.SYSTEM_NOT_FIRST: "a system message may only come first (and only once)",
    Reason.INVALID_TOOLS: 'tools is a list of {"type": "function", "function": {"name", "description", "parameters"}}',
    Reason.INVALID_TOOL_CALL: 'a tool call is {"id", "type": "function", "function": {"name", "arguments"}}',
    Reason.INVALID_ARGUMENTS: "a call's arguments must be a JSON object (or a string holding one)",
    Reason.UNKNOWN_TOOL: "call only tools of the record's 'tools' (or --tools file), or pass --unknown-tool warn",
    Reason.UNMATCHED_TOOL_RESULT: "a tool message's tool_call_id must name a call of the assistant turn before it",
    Reason.TOOL_RESULT_BEFORE_CALL: "tool results come after the assistant message whose tool_calls they answer",
    Reason.TEMPLATE_ERROR: "the chat template refused this conversation; see the message",
    Reason.BAD_ENCODING: "save the file as UTF-8",
    Reason.IDENTICAL_PAIR: "a pair's chosen and rejected replies must differ (nothing to prefer)",
    Reason.EMPTY_SIDE: "a pair needs a non-empty chosen and a non-empty rejected reply",
    Reason.PROMPT_MISMATCH: "chosen and rejected must answer the same prompt (the 'prompt' field, or the same "
    "leading messages when they are whole conversations)",
    Reason.DUPLICATE: "an identical conversation appeared earlier; only the first is kept",
    Reason.CONFLICTING_LABEL: "the same conversation is labelled both desirable and undesirable; "
    "fix the label of one copy (this later copy is left out)",
    Reason.TOO_LONG: "raise data.max_seq_length, or use --on-long truncate",
}


def location(source: str, unit: str, number: int) -> str:
    """Where a record is, for people: ``file:LINE``, ``file row N`` or ``file[INDEX]`` (a JSON array)."""
    if unit == "index":
        return f"{source}[{number}]"
    if unit == "row":
        return f"{source} row {number}"
    return f"{source}:{number}"


class RecordError(Exception):
    """Raised while normalizing one record; caught by the pipeline and turned into a rejection."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class Rejection:
    """One rejected record: where it was, why, and (optionally) what it held."""

    source: str
    line: int
    unit: str  # "line", "row" or "index" (0-based position of a record in a .json file)
    reason: Reason
    message: str
    content: Any = None

    @property
    def where(self) -> str:
        return location(self.source, self.unit, self.line)

    def to_json(self, with_content: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "file": self.source,
            self.unit: self.line,
            "reason": self.reason.value,
            "message": self.message,
        }
        if with_content and self.content is not None:
            d["content"] = self.content
        return d


_PCT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_max_bad(value: str | float | int) -> float:
    """``"5%"``, ``"0.05"`` or ``0.05`` -> 0.05; anything outside 0..100% is a usage error."""
    frac: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        frac = float(value)
    elif isinstance(value, str):
        m = _PCT.match(value)
        try:
            frac = float(m.group(1)) / 100 if m else float(value)
        except ValueError:
            frac = None
    if frac is None or not 0 <= frac <= 1:
        raise FtError(
            ErrorCode.USAGE,
            f"--max-bad {value!r} is not a fraction of records",
            "give a percentage such as 5% or a fraction such as 0.05 (between 0 and 1)",
        )
    return frac


def too_many_bad(bad: int, total: int, max_bad: float) -> bool:
    """True when the share of bad records is above the tolerated fraction (equal is still fine)."""
    if total <= 0:
        return False
    # Compare in integers where possible so that e.g. 5 bad of 100 at 5% passes exactly.
    return bad > max_bad * total + 1e-9
