"""Run the dashboard: check the exposure rule of `ft serve`, bind, and serve with uvicorn until Ctrl-C."""

from __future__ import annotations

from collections.abc import Callable

from ft.config.secrets import load_secrets
from ft.server.config import ServerConfig
from ft.server.run import listen, serve_on
from ft.ui.app import UiConfig, create_app
from ft.workspace import Workspace


def ui_config(ws: Workspace, host: str, port: int, max_upload_mb: float = 64.0) -> UiConfig:
    """The dashboard's settings; the key is `ft serve`'s serve_api_key (an empty one is no key)."""
    key = ServerConfig(host=host, api_key=load_secrets(ws).serve_api_key).api_key
    return UiConfig(host=host, port=port, api_key=key, max_upload_bytes=int(max_upload_mb * (1 << 20)))


def run_ui(ws: Workspace, config: UiConfig, on_listening: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted; refuses a non-loopback host without a (long enough) key before binding.
    Jobs started from the page keep running when this returns."""
    import uvicorn

    sock = listen(ServerConfig(host=config.host, api_key=config.api_key))
    app = create_app(ws, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,  # open event streams end after 2 s
            server_header=False,
        )
    )
    serve_on(server, sock, on_listening)
