"""Bind the socket and run uvicorn until Ctrl-C / SIGTERM."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from ft.errors import ErrorCode, FtError
from ft.server.app import create_app
from ft.server.config import ServerConfig
from ft.server.protocol import guarded_protocol
from ft.server.security import is_loopback
from ft.server.source import ModelSource

log = logging.getLogger("ft.server")

MIN_KEY_CHARS = 16


def check_exposure(config: ServerConfig) -> None:
    """Refuse to listen beyond this machine without an API key (and with a guessable one)."""
    if is_loopback(config.host):
        return
    key = config.api_key.get_secret_value() if config.api_key else ""
    if not key:
        raise FtError(
            ErrorCode.SERVE_UNSAFE,
            f"refusing to listen on {config.host!r}: not a loopback address (other machines could reach it) and no API key is set",
            "set serve_api_key in passwords.yml (clients then send 'Authorization: Bearer <key>'), "
            "or keep the default --host 127.0.0.1",
        )
    if len(key) < MIN_KEY_CHARS:
        raise FtError(
            ErrorCode.SERVE_UNSAFE,
            f"serve_api_key is {len(key)} characters; a key guarded only by length {len(key)} is guessable",
            f"use at least {MIN_KEY_CHARS} random characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a clear error (port in use, unknown host)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise FtError(ErrorCode.USAGE, f"cannot resolve --host {host!r}: {e}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only then, and without it
    # every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        hint = "pick another with --port (0 picks a free one)" if e.errno in (98, 48) else None
        raise FtError(ErrorCode.USAGE, f"cannot listen on {host}:{port}: {e.strerror}", hint) from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def configure_logging() -> None:
    """Access log and server messages on stderr, one line each (no prompts, no headers)."""
    logger = logging.getLogger("ft.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.getLogger("ft.models").setLevel(logging.INFO)


def listen(config: ServerConfig) -> socket.socket:
    """The listening socket for ``config``, once the exposure rule holds (and with logging set up)."""
    check_exposure(config)
    configure_logging()
    return bind(config.host, config.port)


def serve_on(server: Any, sock: socket.socket, on_listening: Callable[[str], None] | None = None) -> None:
    """Run the uvicorn ``server`` on ``sock`` until it exits (``on_listening`` gets the URL first)."""
    if on_listening is not None:
        on_listening(url_of(sock))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def run_server(
    config: ServerConfig, source: ModelSource, on_listening: Callable[[str], None] | None = None
) -> None:
    """Serve until interrupted. Raises FtError when the default model cannot be loaded at start-up."""
    import uvicorn

    sock = listen(config)
    fatal: list[Exception] = []
    server: uvicorn.Server | None = None

    def on_fatal(e: Exception) -> None:
        fatal.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(config, source, on_fatal=on_fatal)
    uv_config = uvicorn.Config(
        app,
        # h11 with a header timeout and a cap on open connections that closes idle ones first
        # (uvicorn's limit_concurrency would count idle sockets against real requests).
        http=guarded_protocol(config.header_timeout, config.max_connections, config.max_client_connections),
        log_level="warning",
        access_log=False,  # ours logs tokens and latency, and never the query string
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,  # a request head larger than this is refused (400)
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=5,  # Ctrl-C: running generations get 5 s to finish, then the server exits
    )
    server = uvicorn.Server(uv_config)
    serve_on(server, sock, on_listening)
    if fatal:
        e = fatal[0]
        if isinstance(e, FtError):
            raise e
        raise FtError(
            ErrorCode.MODEL_INVALID, f"could not load {config.default_model}: {type(e).__name__}: {e}"
        )
