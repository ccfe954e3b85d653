"""FtSettings: process-level settings from FT_* environment variables (not training settings).

Loaded fresh by :func:`load_settings` where needed and frozen: there is no mutable global.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class FtSettings(BaseSettings):
    """Environment-level switches. Training settings live in train.yml (FT_SECTION__KEY overrides them)."""

    model_config = SettingsConfigDict(
        env_prefix="FT_", frozen=True, extra="ignore", use_attribute_docstrings=True
    )

    workspace: Path | None = None

    @field_validator("workspace", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v == "" else v

    """Workspace folder (FT_WORKSPACE); otherwise the nearest folder upwards holding train.yml."""

    models_cache: Path | None = None
    """A models folder shared between workspaces (FT_MODELS_CACHE); default: the workspace's models/."""

    no_blas_preload: bool = False
    """FT_NO_BLAS_PRELOAD=1 stops ft from re-executing itself with an optimized BLAS on Linux."""

    debug: bool = False
    """FT_DEBUG=1 shows tracebacks for every error, like --debug."""


def load_settings() -> FtSettings:
    return FtSettings()
