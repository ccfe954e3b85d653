"""The routes of `ft serve`, one module per concern; :func:`ft.server.app.create_app` adds them.

:class:`RouteGroup` is how a module declares its routes (also used by the dashboard, :mod:`ft.ui.routes`):
decorators like an ``APIRouter``'s, recorded at import, then :meth:`RouteGroup.add_to` makes them routes
of one application with ``FastAPI.add_api_route``. Unlike ``include_router`` (nested, not copied, since
FastAPI 0.165) the routes stay flat in ``app.routes``, in declaration order, on every FastAPI version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI

F = TypeVar("F", bound=Callable[..., Any])


class RouteGroup:
    def __init__(self) -> None:
        self.routes: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []

    def route(self, method: str, path: str, **options: Any) -> Callable[[F], F]:
        def add(endpoint: F) -> F:
            self.routes.append((path, endpoint, {"methods": [method], **options}))
            return endpoint

        return add

    def get(self, path: str, **options: Any) -> Callable[[F], F]:
        return self.route("GET", path, **options)

    def post(self, path: str, **options: Any) -> Callable[[F], F]:
        return self.route("POST", path, **options)

    def put(self, path: str, **options: Any) -> Callable[[F], F]:
        return self.route("PUT", path, **options)

    def delete(self, path: str, **options: Any) -> Callable[[F], F]:
        return self.route("DELETE", path, **options)

    def add_to(self, app: FastAPI) -> None:
        for path, endpoint, options in self.routes:
            app.add_api_route(path, endpoint, **options)
