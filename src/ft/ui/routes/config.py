"""train.yml: show, its schema for the form, validate values, save them."""

from __future__ import annotations

import json
from typing import Any

from ft.errors import ErrorCode, FtError
from ft.server.routes import RouteGroup
from ft.services import project as project_svc
from ft.ui.configfile import ConfigSaved, ConfigSchema, config_schema, field_errors, save_config
from ft.ui.schemas import ConfigCheck, ConfigValues
from ft.ui.state import State
from ft.workspace import Workspace

routes = RouteGroup()


@routes.get("/api/config")
def config_get(state: State) -> project_svc.ConfigReport:
    return project_svc.show_config(state.ws)


@routes.get("/api/config/schema")
def config_schema_(state: State) -> ConfigSchema:
    return config_schema(state.ws)


def _check(ws: Workspace, values: dict[str, Any]) -> ConfigCheck:
    sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    try:
        project_svc.show_config(ws, sets)
    except FtError as e:
        return ConfigCheck(ok=False, errors=field_errors(e.message), message=e.message)
    return ConfigCheck(ok=True, errors={})


@routes.post("/api/config/validate")
def config_validate(body: ConfigValues, state: State) -> ConfigCheck:
    return _check(state.ws, body.values)


@routes.put("/api/config")
def config_put(body: ConfigValues, state: State) -> ConfigSaved:
    check = _check(state.ws, body.values)
    if not check.ok:
        raise FtError(ErrorCode.CONFIG_INVALID, check.message or "invalid configuration", None)
    return save_config(state.ws, body.values)
