"""Request bodies of the OpenAI-compatible API, validated strictly enough that nothing odd reaches MLX.

Unknown fields are ignored (clients send many optional ones); fields we accept but cannot honour
(n > 1, logprobs, tools, image parts) are refused with a 422 naming the field, rather than silently
ignored. Numbers must be finite, strings must be valid Unicode (a lone surrogate would crash the
tokenizer), and sizes are bounded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16
MAX_STOP_CHARS = 256
SEED_MAX = 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1


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
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

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
    logprobs: Any = None
    user: str | None = Field(None, max_length=512)

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

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def stops(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    def bias(self) -> dict[int, float] | None:
        return {int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools (function calling) are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format other than {'type': 'text'} is not supported")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[
            list[Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]], Field(min_length=1, max_length=1_000_000)
        ]
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # the OpenAI default for completions
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

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens
