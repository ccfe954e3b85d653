"""Workspace lookup, consoles and result rendering shared by every command (options: ft.cli.options)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.table import Table

from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace


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


def confirm_delete(what: str, yes: bool, as_json: bool) -> None:
    """Ask before deleting ``what`` (--yes skips the question); with --json or without a terminal to ask
    on, refuse with a usage error; a "no" exits 1 with nothing deleted."""
    if yes:
        return
    if as_json or not sys.stdin.isatty():
        raise FtError(ErrorCode.USAGE, f"deleting {what} needs confirmation", "pass --yes")
    if not typer.confirm(f"Delete {what}?", default=False):
        raise typer.Exit(1)


def notes(con: Console, items: Iterable[str], label: str = "note", style: str = "yellow") -> None:
    """A result's warnings or notes, one a line, each after its label."""
    for text in items:
        con.print(f"[{style}]{label}:[/] {text}", highlight=False)


def fields_table(
    rows: Iterable[tuple[str, RenderableType | None]],
    title: str | None = None,
    value_header: str = "",
    label_style: str = "",
    **table: Any,
) -> Table:
    """A table of label/value rows, leaving out a row whose value is None (a header with value_header)."""
    t = Table(title=title, title_justify="left", show_header=bool(value_header), **table)
    t.add_column("", style=label_style)
    t.add_column(value_header, overflow="fold")
    for label, value in rows:
        if value is not None:
            t.add_row(label, value)
    return t


R = TypeVar("R", bound=BaseModel)


def emit(result: R, as_json: bool, render: Callable[[Console, R], None]) -> None:
    """Print a service result: JSON for scripts, or the command's rich rendering for people."""
    if as_json:
        sys.stdout.write(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    else:
        render(console(), result)
