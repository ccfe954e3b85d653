"""`ft ui`: the web dashboard and REST API over this workspace."""

from __future__ import annotations

import webbrowser
from typing import Annotated

import typer

from ft.cli.common import console, get_workspace
from ft.cli.options import HostOpt, PortOpt
from ft.ui.serve import run_ui, ui_config


def ui(
    ctx: typer.Context,
    port: PortOpt = 7860,
    host: HostOpt = "127.0.0.1",
    open_: Annotated[bool, typer.Option("--open", help="Open the page in a browser.")] = False,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="Largest dataset upload (MB).")
    ] = 64.0,
) -> None:
    """Serve the dashboard (runs, datasets, models, config, evaluate, export, playground) and its REST API.

    Jobs started from the page run as `ft` processes and keep running when `ft ui` stops.
    """
    ws = get_workspace(ctx)
    config = ui_config(ws, host, port, max_upload_mb)

    def listening(url: str) -> None:
        con = console()
        con.print(f"[bold green]ft ui[/] on [bold]{url}[/]  (API: {url}/api/openapi.json)", highlight=False)
        con.print(
            f"  auth: {'on (Bearer serve_api_key; the page asks for it)' if config.api_key else 'off (loopback only)'}"
            "\n  stop with Ctrl-C (jobs keep running)",
            highlight=False,
        )
        con.file.flush()
        if open_:
            webbrowser.open(url)

    run_ui(ws, config, on_listening=listening)
