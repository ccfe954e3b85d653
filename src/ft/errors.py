"""Typed errors shared by every layer.

An :class:`FtError` is a user-facing failure: the CLI prints its message and hint on one or two
lines and exits with the code of its :class:`ErrorCode` (``--debug`` adds the traceback). Anything
else that escapes is a bug and is shown with a traceback.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error identifiers; the value is what ``--json`` output and logs carry."""

    USAGE = "usage"
    CONFIG_INVALID = "config_invalid"
    CONFIG_MISSING = "config_missing"
    SECRETS_INSECURE = "secrets_insecure"
    SECRETS_INVALID = "secrets_invalid"
    WORKSPACE_NOT_FOUND = "workspace_not_found"
    WORKSPACE_EXISTS = "workspace_exists"
    NAME_INVALID = "name_invalid"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    MODEL_UNSUPPORTED = "model_unsupported"
    MODEL_INVALID = "model_invalid"
    MODEL_DOWNLOAD = "model_download"
    AUTH_REQUIRED = "auth_required"
    PACKAGE_MISSING = "package_missing"
    DATA_INVALID = "data_invalid"
    DATA_TOO_MANY_BAD = "data_too_many_bad"
    BAD_COMPRESSION = "bad_compression"
    TRAINING_DIVERGED = "training_diverged"
    RANK_LOST = "rank_lost"
    CHECKPOINT_INVALID = "checkpoint_invalid"
    RESUME_MISMATCH = "resume_mismatch"
    EXPORT_FAILED = "export_failed"
    SERVE_UNSAFE = "serve_unsafe"
    OUT_OF_MEMORY = "out_of_memory"
    INTERRUPTED = "interrupted"
    ENVIRONMENT = "environment"
    INTERNAL = "internal_error"


# Exit codes group the error codes so scripts can branch on a number without parsing text.
_EXIT_CODES: dict[ErrorCode, int] = {
    ErrorCode.USAGE: 2,
    ErrorCode.CONFIG_INVALID: 3,
    ErrorCode.CONFIG_MISSING: 3,
    ErrorCode.SECRETS_INSECURE: 3,
    ErrorCode.SECRETS_INVALID: 3,
    ErrorCode.WORKSPACE_NOT_FOUND: 4,
    ErrorCode.WORKSPACE_EXISTS: 4,
    ErrorCode.NAME_INVALID: 2,
    ErrorCode.NOT_FOUND: 5,
    ErrorCode.ALREADY_EXISTS: 5,
    ErrorCode.MODEL_UNSUPPORTED: 6,
    ErrorCode.MODEL_INVALID: 6,
    ErrorCode.MODEL_DOWNLOAD: 6,
    ErrorCode.AUTH_REQUIRED: 6,
    ErrorCode.PACKAGE_MISSING: 6,
    ErrorCode.DATA_INVALID: 7,
    ErrorCode.DATA_TOO_MANY_BAD: 7,
    ErrorCode.BAD_COMPRESSION: 7,
    ErrorCode.TRAINING_DIVERGED: 8,
    ErrorCode.RANK_LOST: 8,
    ErrorCode.CHECKPOINT_INVALID: 8,
    ErrorCode.RESUME_MISMATCH: 8,
    ErrorCode.EXPORT_FAILED: 9,
    ErrorCode.SERVE_UNSAFE: 10,
    ErrorCode.OUT_OF_MEMORY: 11,
    ErrorCode.INTERRUPTED: 130,
    ErrorCode.ENVIRONMENT: 13,
    ErrorCode.INTERNAL: 1,
}


class FtError(Exception):
    """A failure the user can act on: what went wrong (``message``) and what to do (``hint``)."""

    def __init__(
        self, code: ErrorCode, message: str, hint: str | None = None, *, exit_code: int | None = None
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.exit_code = exit_code if exit_code is not None else _EXIT_CODES.get(code, 1)

    def to_dict(self) -> dict[str, str | int | None]:
        return {
            "error": self.code.value,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"
