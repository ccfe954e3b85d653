"""Shared option aliases, workspace lookup, consoles and result rendering for every command."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

from ft.workspace import Workspace

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON (for scripts).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a train.yml setting for this command: section.key=value (repeatable)."
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="train.yml to use instead of the workspace's.", dir_okay=False),
]
NameOpt = Annotated[str | None, typer.Option("--name", "-n", help="Name to record it under.")]


@dataclass(frozen=True)
class CliState:
    """Global options, stored on the click context by the root callback."""

    workspace: Path | None = None
    debug: bool = False


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_object(CliState)
    return obj if obj is not None else CliState()


def get_workspace(ctx: typer.Context) -> Workspace:
    """The workspace named by --workspace / FT_WORKSPACE, or found upwards from the current folder."""
    return Workspace.find(state(ctx).workspace)


def console() -> Console:
    # Created per call so it writes to the current sys.stdout (tests capture it).
    return Console(file=sys.stdout, soft_wrap=True)


def err_console() -> Console:
    return Console(file=sys.stderr, soft_wrap=True)


R = TypeVar("R", bound=BaseModel)


def emit(result: R, as_json: bool, render: Callable[[Console, R], None]) -> None:
    """Print a service result: JSON for scripts, or the command's rich rendering for people."""
    if as_json:
        sys.stdout.write(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    else:
        render(console(), result)
