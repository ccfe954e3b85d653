"""The dashboard's routes, one module per concern (page, runs and training, jobs, models, datasets,
config, evaluations and exports, inference); :func:`ft.ui.app.create_app` adds them in this order."""

from __future__ import annotations

from typing import Any

from ft.workspace import validate_name


def flag(name: str, value: Any) -> list[str]:
    """The `ft` arguments for an option: none when unset or false, the bare flag when true."""
    if value is None or value is False:
        return []
    if value is True:
        return [name]
    return [name, str(value)]


def name_arg(option: str | None, value: str | None, what: str) -> list[str]:
    """The `ft` arguments for a name (run, checkpoint, split …), refused unless it is a plain name: none
    when unset, ``[option, name]``, or ``[name]`` for a positional argument (``option`` None)."""
    if not value:
        return []
    name = validate_name(value, what)
    return [name] if option is None else [option, name]
