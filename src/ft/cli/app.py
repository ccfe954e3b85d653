"""The root `ft` command: global options, sub-commands, and turning errors into one clear message."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer import Abort, Exit

try:  # typer >= 0.2x ships its own copy of click; older versions use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException  # type: ignore[assignment]

from ft import __version__
from ft.cli import config as config_cmd
from ft.cli import dataset, doctor, evaluate, export, models, runs, serve, train, tune, ui
from ft.cli import init as init_cmd
from ft.cli.common import CliState, err_console
from ft.config.settings import load_settings
from ft.errors import ErrorCode, FtError

app = typer.Typer(
    name="ft",
    help="Fine-tune open LLMs on your own machine with LoRA on MLX.\n\n"
    "Workflow: ft init → ft models pull → ft dataset prepare data.jsonl → ft train → "
    "ft evaluate --checkpoint best → ft export --format gguf → ft serve",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ft {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace",
            "-w",
            help="Workspace folder (default: FT_WORKSPACE, else found upwards from here).",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    ctx.obj = CliState(workspace=workspace, debug=debug)


app.command("init")(init_cmd.init)
app.add_typer(models.app, name="models", help="Pull, list, inspect and remove base models.")
app.add_typer(dataset.app, name="dataset", help="Prepare, validate, inspect and remove datasets.")
app.command("train")(train.train)
app.add_typer(runs.app, name="runs", help="List, inspect and plot training runs.")
app.command("evaluate")(evaluate.evaluate)
app.command("export")(export.export)
app.command("serve")(serve.serve)
app.command("tune")(tune.tune)
app.command("ui")(ui.ui)
app.add_typer(config_cmd.app, name="config", help="Show the resolved configuration.")
app.command("doctor")(doctor.doctor)


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """--debug works anywhere on the line (`ft train --debug` as well as `ft --debug train`)."""
    debug = "--debug" in argv or load_settings().debug
    rest = [a for a in argv if a != "--debug"]
    return (["--debug", *rest] if debug else rest), debug


def run(argv: list[str] | None = None) -> int:
    """Run `ft` with ``argv`` and return the exit code; errors never escape as tracebacks unless --debug."""
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    as_json = "--json" in argv
    try:
        rv = app(args=argv, prog_name="ft", standalone_mode=False)
        return int(rv or 0)
    except FtError as e:
        if debug:
            traceback.print_exc()
        if as_json:
            sys.stdout.write(json.dumps(e.to_dict(), indent=2) + "\n")
        else:
            con = err_console()
            con.print(f"[bold red]error:[/] {e.message}", highlight=False, markup=True)
            if e.hint:
                con.print(f"[yellow]hint:[/] {e.hint}", highlight=False)
        return e.exit_code
    except Exit as e:
        return e.exit_code
    except ClickException as e:
        e.show()
        return e.exit_code
    except (Abort, KeyboardInterrupt) as e:
        if not isinstance(e.__cause__, EOFError):
            err_console().print("interrupted")
            return 130
        # click turns an EOFError escaping a command into Abort: that is a bug, not Ctrl-C.
        return _internal(e.__cause__, debug, as_json)
    except BrokenPipeError:
        return 141
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - a bug (even a BaseException such as pyo3's PanicException)
        return _internal(e, debug, as_json)


def _internal(e: BaseException, debug: bool, as_json: bool) -> int:
    """A bug, not a user error: say so briefly (a JSON error with --json), full detail with --debug."""
    if debug:
        traceback.print_exception(e)
    internal = FtError(
        ErrorCode.INTERNAL,
        f"{type(e).__name__}: {e}",
        "rerun with --debug for the traceback, and please report it",
    )
    if as_json:
        sys.stdout.write(json.dumps(internal.to_dict(), indent=2) + "\n")
    elif not debug:
        err_console().print(
            f"[bold red]internal error:[/] {escape(internal.message)}\n[yellow]hint:[/] {internal.hint}",
            highlight=False,
        )
    return internal.exit_code
