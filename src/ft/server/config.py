"""Settings of one `ft serve` process (built by the serving service from the command line)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class ServerConfig(BaseModel):
    """How the server listens, whom it lets in, and how much work it accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    host: str = DEFAULT_HOST
    """Interface to bind. Loopback by default; anything else needs api_key."""

    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    """TCP port; 0 picks a free one (printed at start-up)."""

    api_key: SecretStr | None = None
    """When set, every route but /health needs `Authorization: Bearer <api_key>`."""

    default_model: str | None = None
    """Model used when a request names none; loaded at start-up."""

    max_models: int = Field(1, ge=1, le=64)
    """Models kept in memory at once; the least recently used one is unloaded first."""

    max_queue: int = Field(16, ge=0, le=10_000)
    """Requests waiting behind the one generating; more get 429."""

    max_tokens: int | None = Field(None, ge=1)
    """Upper bound on generated tokens per request (on top of the context left); None: the context."""

    request_timeout: float = Field(600.0, gt=0)
    """Seconds a request may take in all (waiting + generating) before it is stopped with 504."""

    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body accepted; bigger ones get 413."""

    cors_origins: tuple[str, ...] = ()
    """Origins allowed by CORS (browser apps); empty: CORS off."""

    log_prompts: bool = False
    """Log prompt and completion text (off: only sizes, timings and token counts are logged)."""
