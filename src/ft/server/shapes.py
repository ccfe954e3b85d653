"""The JSON of OpenAI's answers: model entries, chat and text completions (whole or as stream chunks),
log-probabilities, streamed tool calls, and the server-sent-event framing."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from ft.server.generation import TokenLogprob
from ft.server.source import ModelInfo, ToolSupport


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def model_entry(m: ModelInfo) -> dict[str, Any]:
    return {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "ft",
        "kind": m.kind,
        **({"base": m.base, "run": m.run, "checkpoint": m.checkpoint} if m.kind == "tuned" else {}),
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**one(e.text, e.logprob), "top_logprobs": [one(t, lp) for _, t, lp in e.top]} for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


class ToolStream:
    """Streams a chat whose answer may hold tool calls, as the OpenAI API does.

    Text before a call marker (``<tool_call>``, ``[TOOL_CALLS]`` …) streams as content; from the marker on
    the text is held back, and at the end the calls are sent as ``tool_calls`` deltas (per call: id, type
    and name with empty arguments, then the arguments) with finish_reason ``tool_calls``. When no call
    can be read, the held text is sent as content after all.
    """

    def __init__(self, tools: ToolSupport, chunk: Callable[..., dict[str, Any]]):
        self.tools = tools
        self.chunk = chunk
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.holding = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.holding:
            return ""
        rest = self.text[self.sent :]
        hits = [i for i in (rest.find(m) for m in self.tools.markers) if i != -1]
        if hits:
            self.holding = True
            out = rest[: min(hits)]
        else:  # hold back a tail that may be the start of a marker
            hold = 0
            for m in self.tools.markers:
                for k in range(min(len(m) - 1, len(rest)), hold, -1):
                    if rest.endswith(m[:k]):
                        hold = k
                        break
            out = rest[: len(rest) - hold]
        self.sent += len(out)
        return out

    def close(self, finish: str) -> tuple[list[dict[str, Any]], str]:
        _, calls, _ = self.tools.parse(self.text)
        if not calls:
            rest = self.text[self.sent :]
            return ([self.chunk(rest, None, [])] if rest else []), finish
        out = []
        for i, c in enumerate(calls):
            head = {
                "index": i,
                "id": c["id"],
                "type": "function",
                "function": {"name": c["function"]["name"], "arguments": ""},
            }
            out.append(self.chunk(None, None, [], {"tool_calls": [head]}))
            args = {"index": i, "function": {"arguments": c["function"]["arguments"]}}
            out.append(self.chunk(None, None, [], {"tool_calls": [args]}))
        return out, "tool_calls"


class _Answer:
    """What chat and text completions share: the id, the creation time, the model, the envelope."""

    prefix = ""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time()), model

    def envelope(self, object: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice}],
        }

    def opening(self) -> dict[str, Any] | None:
        """The first chunk of a stream, before any text (None: none)."""
        return None

    def make_filter(self) -> ToolStream | None:
        """What streamed text passes through before it is sent (None: sent as generated)."""
        return None


class ChatAnswer(_Answer):
    """A chat completion; ``parser`` is set (on the worker) when the answer may hold tool calls."""

    prefix = "chatcmpl"

    def __init__(self, model: str):
        super().__init__(model)
        self.parser: ToolSupport | None = None

    def chunk(
        self,
        text: str | None,
        finish: str | None,
        entries: list[TokenLogprob],
        delta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        delta = dict(delta or {})
        if text is not None:
            delta["content"] = text
        logprobs = chat_logprobs(entries) if entries else None
        choice = {"delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return self.envelope("chat.completion.chunk", choice)

    def whole(
        self, text: str, finish: str, usage: dict[str, Any], entries: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.parser is not None:
            content, calls, _ = self.parser.parse(text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls"
        logprobs = None if entries is None else chat_logprobs(entries)
        choice = {"message": message, "finish_reason": finish, "logprobs": logprobs}
        return {**self.envelope("chat.completion", choice), "usage": usage}

    def opening(self) -> dict[str, Any] | None:
        return self.chunk(None, None, [], {"role": "assistant", "content": ""})

    def make_filter(self) -> ToolStream | None:
        return ToolStream(self.parser, self.chunk) if self.parser is not None else None


class CompletionAnswer(_Answer):
    """A text completion; streamed chunks count the characters sent for their logprobs' text offsets."""

    prefix = "cmpl"

    def __init__(self, model: str):
        super().__init__(model)
        self.offset = 0

    def chunk(self, text: str | None, finish: str | None, entries: list[TokenLogprob]) -> dict[str, Any]:
        lp = completion_logprobs(entries, self.offset) if entries else None
        self.offset += len(text or "")
        return self.envelope("text_completion", {"text": text or "", "finish_reason": finish, "logprobs": lp})

    def whole(
        self, text: str, finish: str, usage: dict[str, Any], entries: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        logprobs = None if entries is None else completion_logprobs(entries, 0)
        choice = {"text": text, "finish_reason": finish, "logprobs": logprobs}
        return {**self.envelope("text_completion", choice), "usage": usage}


Answer = ChatAnswer | CompletionAnswer
