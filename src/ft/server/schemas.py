"""Request bodies of the OpenAI-compatible API, validated strictly enough that nothing odd reaches MLX.

Unknown fields are ignored (clients send many optional ones); an explicit ``null`` means "the default",
as with OpenAI. Fields we accept but cannot honour (n > 1, image parts, JSON-constrained output, tool
calls on a server without tool support) are refused with a 400 naming the field in ``param``, rather
than silently ignored. Numbers must be finite, strings must be valid Unicode (a lone surrogate would
crash the tokenizer), and sizes are bounded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP = 16
MAX_STOP_CHARS = 256
SEED_MAX = 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions allow logprobs up to 5
MAX_COMPLETION_LOGPROBS = 5
MAX_TOOLS = 128
# Completion fields accepted only with the value that asks for nothing: field -> (those values, the refusal).
NO_OP_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "echo": ((False,), "echo is not supported"),
    "suffix": ((None, ""), "suffix is not supported"),
    "best_of": ((None, 1), "only best_of=1 is supported"),
}
# Fields where OpenAI accepts an explicit null meaning "the default".
NULLABLE = (
    "temperature",
    "top_p",
    "n",
    "stream",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "parallel_tool_calls",
)


def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (lone surrogate)") from None
    return s


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, str_max_length=4_000_000)


class TextPart(_Body):
    type: Literal["text"]
    text: str

    _check = field_validator("text")(classmethod(lambda cls, v: _valid_unicode(v)))


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = Field(None, max_length=256)
    function_call: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(
                        f"content[{i}]: only text parts are supported, not {str(part.get('type'))[:40]!r}"
                    )
        return v

    @field_validator("content")
    @classmethod
    def _unicode(cls, v: Any) -> Any:
        if isinstance(v, str):
            _valid_unicode(v)
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = Field(None, min_length=1, max_length=512)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    # Below MIN_TEMPERATURE (generation.py) sampling is greedy, as at 0.
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=512)

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        """An explicit null is the field's default (OpenAI accepts null for all of these)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in NULLABLE)}
        return data

    @field_validator("model")
    @classmethod
    def _model_unicode(cls, v: str | None) -> str | None:
        return None if v is None else _valid_unicode(v)

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        for s in stops:
            if not s:
                raise ValueError("stop sequences must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop sequences are limited to {MAX_STOP_CHARS} characters")
            _valid_unicode(s)
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return None
        if len(v) > 1024:
            raise ValueError("at most 1024 logit_bias entries")
        for k, b in v.items():
            if not k.isdigit() or int(k) > TOKEN_ID_MAX:
                raise ValueError(f"logit_bias keys are token ids, got {k[:40]!r}")
            if not -100 <= b <= 100:
                raise ValueError("logit_bias values must be between -100 and 100")
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens

    def stops(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    def bias(self) -> dict[int, float] | None:
        return {int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None

    def logprob_settings(self) -> tuple[bool, int]:
        """(report log-probabilities, how many alternatives per token)."""
        return False, 0


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("messages")
    @classmethod
    def _no_legacy_calls(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        for i, m in enumerate(v):
            if m.function_call is not None or m.role == "function":
                raise ValueError(
                    f"messages[{i}]: legacy function calls (function_call, role 'function') are not supported; "
                    "send tool_calls and 'tool' messages"
                )
            if m.tool_calls is not None and m.role != "assistant":
                raise ValueError(f"messages[{i}]: only assistant messages carry tool_calls")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[Any] | None) -> list[Any] | None:
        if not v:
            return None
        if len(v) > MAX_TOOLS:
            raise ValueError(f"at most {MAX_TOOLS} tools")
        for i, t in enumerate(v):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
                raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
            if not isinstance(fn.get("name"), str) or not fn["name"].strip():
                raise ValueError(f"tools[{i}].function has no name")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or v in ("none", "auto"):
            return v
        tools = info.data.get("tools") or []
        if v == "required":
            if not tools:
                raise ValueError("tool_choice 'required' needs tools")
            return v
        name = (v.get("function") or {}).get("name") if isinstance(v, dict) else None
        if not isinstance(name, str):
            raise ValueError(
                "tool_choice is 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
            )
        if name not in {t["function"]["name"] for t in tools}:
            raise ValueError(f"tool_choice names {name[:64]!r}, which is not in tools")
        return v

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("functions (legacy function calling) are not supported by this server")
        return None

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, v: Any) -> Any:
        if v not in (None, "none", "auto"):
            raise ValueError("function_call (legacy function calling) is not supported by this server")
        return None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type") not in (None, "text"):
            raise ValueError(
                f"response_format {str(v.get('type'))[:40]!r} (JSON-constrained output) is not supported; "
                "leave it out or use {'type': 'text'}"
            )
        return v

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def uses_tools(self) -> bool:
        """Tools or tool calls are in play: the tool-aware renderer and (with tools) the call parser."""
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)

    def active_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown: none for tool_choice 'none', only the named one when one is named."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [t for t in self.tools if t["function"]["name"] == name]
        return list(self.tools)

    def openai_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
            msg["content"] = None if m.content is None and m.tool_calls else m.text()
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            if m.role == "tool":
                if m.tool_call_id is not None:
                    msg["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    msg["name"] = m.name
            out.append(msg)
        return out

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs, self.top_logprobs or 0


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[
            list[Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]], Field(min_length=1, max_length=1_000_000)
        ]
    )
    max_tokens: Annotated[int, Field(ge=1)] = 16  # the OpenAI default for completions (also for null)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return _valid_unicode(v)
        if v and isinstance(v[0], str):
            return [_valid_unicode(v[0])]
        return v

    @field_validator(*NO_OP_ONLY)
    @classmethod
    def _no_op_only(cls, v: Any, info: ValidationInfo) -> Any:
        allowed, message = NO_OP_ONLY[info.field_name or ""]
        if v not in allowed:
            raise ValueError(message)
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0
