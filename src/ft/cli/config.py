"""`ft config show`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ft.cli.common import emit, state
from ft.cli.options import ConfigOpt, JsonOpt, SetOpt
from ft.errors import FtError
from ft.services import project
from ft.workspace import Workspace

app = typer.Typer(no_args_is_help=True)


def _render(con: Console, r: project.ConfigReport) -> None:
    table = Table(title=f"Configuration ({r.path or 'defaults only'})")
    for col in ("key", "value", "source"):
        table.add_column(col)
    for e in r.entries:
        style = "" if e.source == "default" else "bold"
        table.add_row(e.key, str(e.value), e.source, style=style)
    con.print(table)


@app.command("show")
def show(ctx: typer.Context, config: ConfigOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Print every setting, its resolved value and where it came from (default, train.yml:line, env, --set)."""
    ws: Workspace | None
    try:
        ws = Workspace.find(state(ctx).workspace) if config is None else None
    except FtError:
        ws = None  # outside a workspace: defaults + env + --set
    source = config if config is not None else ws
    emit(project.show_config(source, set_ or []), as_json, _render)
