"""passwords.yml: tokens and keys, read into SecretStr and never printed, logged or written elsewhere."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ft.errors import ErrorCode, FtError

PASSWORDS_EXAMPLE = """\
# passwords.yml: secrets for ft. Keep it private: chmod 600 passwords.yml (ft refuses it otherwise).
# It is listed in .gitignore; never commit it. Values can also come from FT_HF_TOKEN, FT_WANDB_API_KEY, ...
hf_token: ""          # Hugging Face token, for gated or private models (huggingface.co/settings/tokens)
wandb_api_key: ""     # Weights & Biases key, when logging.wandb is true
serve_api_key: ""     # required by `ft serve` on a non-loopback --host; clients send Authorization: Bearer <key>
"""


class Secrets(BaseSettings):
    """Secrets from passwords.yml, then FT_* environment variables. Every value is a SecretStr."""

    model_config = SettingsConfigDict(
        env_prefix="FT_", extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    hf_token: SecretStr | None = None
    """Hugging Face access token for gated/private repositories."""

    wandb_api_key: SecretStr | None = None
    """Weights & Biases API key."""

    serve_api_key: SecretStr | None = None
    """Bearer key `ft serve` requires from clients (required on a non-loopback host)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file, the file (passed as init kwargs) over nothing.
        return (env_settings, init_settings)


def check_permissions(path: Path) -> None:
    """Refuse a passwords file that other users can read (POSIX only)."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FtError(
            ErrorCode.SECRETS_INSECURE,
            f"{path} is readable by other users (mode {mode:04o})",
            f"chmod 600 {path}",
        )


def load_secrets(workspace: Any = None, *, path: Path | None = None) -> Secrets:
    """Read passwords.yml of a workspace (optional: missing file = no secrets, env still applies)."""
    if path is None and workspace is not None:
        path = Path(getattr(workspace, "passwords_yml", workspace))
        if path.is_dir():
            path = path / "passwords.yml"
    values: dict[str, Any] = {}
    if path is not None and path.is_file():
        check_permissions(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise FtError(
                ErrorCode.SECRETS_INVALID, f"{path}{line}: not valid YAML", "fix the YAML syntax"
            ) from None
        if raw is not None and not isinstance(raw, dict):
            raise FtError(
                ErrorCode.SECRETS_INVALID, f"{path}: expected 'key: value' lines", "see passwords.yml.example"
            )
        # Empty strings mean "not set", as in the example file.
        values = {k: v for k, v in (raw or {}).items() if v not in (None, "")}
    try:
        return Secrets(**values)
    except ValidationError as e:
        # Never echo the values: only which keys are wrong.
        bad = sorted({str(err["loc"][0]) for err in e.errors() if err["loc"]})
        known = ", ".join(Secrets.model_fields)
        raise FtError(
            ErrorCode.SECRETS_INVALID,
            f"{path or 'environment'}: unknown or invalid secret(s): {', '.join(bad)}",
            f"known keys: {known}",
        ) from None
