"""Exception handlers: every error the `ft serve` application answers is an OpenAI-shaped JSON body.

Malformed requests get 400 ``invalid_request_error`` with ``param`` naming the field (the official client
raises BadRequestError); a bug is a 500 ``server_error`` and a log line, never a traceback to the client.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ft.server.errors import ApiError, error_body
from ft.server.security import clean

log = logging.getLogger("ft.server")

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def _param(loc: tuple[Any, ...]) -> str | None:
    """OpenAI's spelling of a field path, e.g. ``messages.[0].content`` (pydantic's union tags left out)."""
    parts: list[str] = []
    for x in loc:
        if x == "body" and not parts:
            continue
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif isinstance(x, str) and _FIELD.match(x) and x not in _TYPE_TAGS:
            parts.append(x)
        else:
            break
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> ApiError:
    """400 invalid_request_error naming the first bad field in ``param``; input values are never echoed."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "the request body is not valid JSON")
    if any(e.get("type") == "model_attributes_type" and not _param(e.get("loc", ())) for e in errors):
        return ApiError(400, "the request body must be a JSON object")
    parts = []
    for e in errors[:5]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{_param(e.get('loc', ())) or 'body'}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return ApiError(400, "; ".join(parts) + more, param=_param(errors[0].get("loc", ())) if errors else None)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = validation_error(exc)
    return JSONResponse(err.body(), status_code=err.status)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", clean(request.method), clean(request.url.path))
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(StarletteHTTPException)(_http)
    app.exception_handler(Exception)(_bug)
