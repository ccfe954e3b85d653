"""The options several commands share, each declared once (its flags and help text); `field_option` and
`setting`, which make a flag whose help is the docstring of the field it sets (a service's options model,
or a train.yml key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import typer
from pydantic import BaseModel

from ft.config.loader import allowed_values
from ft.config.train import TrainConfig

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
RunArg = Annotated[str | None, typer.Argument(help="Run id or name (default: the latest run).")]
CheckpointOpt = Annotated[
    str, typer.Option("--checkpoint", help="best | latest | step-N | path of a checkpoint folder.")
]


def dataset_option(*short: str, purpose: str = "") -> Any:
    """--dataset: a prepared dataset by reference; ``purpose`` says what for and what is used without it."""
    return typer.Option(
        "--dataset",
        *short,
        help=" ".join(("Prepared dataset NAME (its newest version) or NAME@vN", purpose)).strip() + ".",
    )


YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
# The web servers (ft serve, ft ui); each command gives its own default port.
PortOpt = Annotated[
    int, typer.Option("--port", "-p", help="TCP port (0 picks a free one).", min=0, max=65535)
]
HostOpt = Annotated[
    str,
    typer.Option(
        "--host", help="Interface to bind. Anything but loopback needs serve_api_key in passwords.yml."
    ),
]


def field_option(model: type[BaseModel], name: str, *flags: str, more: str = "", **option: Any) -> Any:
    """A flag for the field ``name`` of ``model``, with the field's own docstring as its help (the model says
    what the value means, once), its values when it has a fixed set, then ``more`` (what the flag adds)."""
    field = model.model_fields[name]
    values = f" Allowed: {allowed_values(model, name)}." if get_origin(field.annotation) is Literal else ""
    return typer.Option(*flags, help=f"{field.description}{values}{more}", **option)


def setting(key: str, *flags: str, more: str = "", **option: Any) -> Any:
    """A flag that sets train.yml's ``key`` (section.name) for one command: its help is that setting's own
    description in config/train.py, ``more``, and where the default comes from."""
    section, name = key.split(".")
    model = TrainConfig.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel), key
    return field_option(model, name, *flags, more=f"{more} Default: train.yml's {key}.", **option)


def command_args(ctx: typer.Context, *cli_only: str) -> dict[str, Any]:
    """The command's parameters by name, less ``cli_only`` (e.g. ``as_json``), for a service whose keyword
    arguments (or options model) are named like them: the list of options is written once, in the signature.
    Repeatable options arrive as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items() if k not in cli_only}
