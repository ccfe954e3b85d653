"""`ft init`: create a workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from ft.cli.common import emit
from ft.cli.options import JsonOpt
from ft.services import project


def _render(con: Console, r: project.InitResult) -> None:
    con.print(f"[bold green]Workspace ready:[/] {r.workspace} (profile: {r.profile})")
    for f in r.created:
        con.print(f"  wrote {f}")
    for b in r.backed_up:
        con.print(f"  [yellow]kept the previous version as[/] {b}")
    con.print(f"  sample data: data/sample.jsonl ({r.sample_records} conversations)")
    con.print(
        "\nNext: [bold]ft models pull smollm2-135m-instruct[/] then [bold]ft dataset prepare data/sample.jsonl[/]"
    )


def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the workspace (created if missing).")] = Path(
        "."
    ),
    profile: Annotated[
        Literal["chat", "instruction", "code", "tools", "domain"],
        typer.Option("--profile", "-p", help="Starting values for the kind of data (see docs/config.md)."),
    ] = "chat",
    force: Annotated[
        bool, typer.Option("--force", help="Rewrite the config files of an existing workspace.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a workspace: train.yml, passwords.yml.example, .gitignore and sample data."""
    emit(project.init_workspace(directory, profile, force), as_json, _render)
