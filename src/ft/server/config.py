"""Settings of one `ft serve` process (built by the serving service from the command line)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS_CHAT = 1024  # tokens a chat may generate when the request sets no max_tokens


class ServerConfig(BaseModel):
    """How the server listens, whom it lets in, and how much work it accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    host: str = DEFAULT_HOST
    """Interface to bind. Loopback by default; anything else needs api_key."""

    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    """TCP port; 0 picks a free one (printed at start-up)."""

    api_key: SecretStr | None = None
    """When set, every route but /health needs `Authorization: Bearer <api_key>`. Empty means no key.
    Without a key, only requests whose Host header names this machine (loopback) are answered."""

    default_model: str | None = None
    """Model used when a request names none; loaded at start-up."""

    max_models: int = Field(1, ge=1, le=64)
    """Models kept in memory at once; the least recently used one is unloaded first."""

    max_queue: int = Field(16, ge=0, le=10_000)
    """Requests waiting beyond those being generated (max_batch); more get 429."""

    max_batch: int = Field(16, ge=1, le=256)
    """Requests for the same model decoded together (continuous batching)."""

    prefill_chunk: int = Field(512, ge=16, le=8192)
    """Prompt tokens read per step; long prompts are read in chunks between decoding steps."""

    max_tokens: int | None = Field(None, ge=1)
    """Upper bound on generated tokens per request (on top of the context left); None: the context."""

    max_tokens_default: int = Field(DEFAULT_MAX_TOKENS_CHAT, ge=1)
    """Tokens a chat completion may generate when the request sets no max_tokens."""

    max_client_requests: int = Field(32, ge=1, le=100_000)
    """Requests one client address may have in progress at once; more get 429."""

    max_client_connections: int = Field(256, ge=1, le=100_000)
    """Open connections from one client address; beyond it that address's longest-idle one is closed."""

    max_connections: int = Field(1024, ge=8, le=100_000)
    """Open connections in all; beyond it the longest-idle connection (no request in progress) is closed."""

    header_timeout: float = Field(10.0, gt=0)
    """Seconds a connection may take to send a complete request head; idle keep-alive connections alike."""

    request_timeout: float = Field(600.0, gt=0)
    """Seconds a request may take in all (waiting + generating) before it is stopped with 504."""

    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body accepted; bigger ones get 413."""

    cors_origins: tuple[str, ...] = ()
    """Origins allowed by CORS (browser apps); empty: CORS off."""

    log_prompts: bool = False
    """Log prompt and completion text (off: only sizes, timings and token counts are logged)."""

    @field_validator("api_key")
    @classmethod
    def _empty_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        """An empty key (e.g. FT_SERVE_API_KEY="") means no key, never "auth on with an empty key"."""
        return v if v is not None and v.get_secret_value().strip() else None
