"""What the dashboard's routes share: the workspace, the settings, the job queue and the playground's
`ft serve` application. One :class:`UiState` per application (``app.state.ui``); a route gets it with
the ``State`` dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, SecretStr

from ft.errors import ErrorCode, FtError
from ft.ui.jobs import JOBS, JobQueue
from ft.workspace import Workspace, validate_name


class UiConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: SecretStr | None = None
    max_upload_bytes: int = 64 << 20
    max_training: int = 1
    serve_chat: bool = True
    """Mount `ft serve`'s OpenAI API at /serve for the playground."""


@dataclass
class Playground:
    """`ft serve`'s application mounted at /serve (None until started, or when there is no model)."""

    app: Any = None
    default_model: str | None = None


@dataclass
class UiState:
    ws: Workspace
    config: UiConfig
    queue: JobQueue
    playground: Playground = field(default_factory=Playground)

    def inside(self, path: Path) -> Path:
        """``path`` resolved, refused unless it is in the workspace."""
        rp = path.resolve()
        root = self.ws.root.resolve()
        if rp != root and root not in rp.parents:
            raise FtError(ErrorCode.NAME_INVALID, f"{path} is outside the workspace", None)
        return rp

    def is_job(self, key: str) -> bool:
        """Whether ``key`` names a job of the queue (else it may name a run)."""
        return (self.ws.root / JOBS / validate_name(key, "job id")).is_dir()


async def _state(request: Request) -> UiState:
    state: UiState = request.app.state.ui
    return state


State = Annotated[UiState, Depends(_state)]
"""A route parameter ``state: State`` is the application's :class:`UiState`."""
