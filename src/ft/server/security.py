"""ASGI middleware for what must hold on every route: the access log, the Host check, per-client limits,
the API key, the body size limit.

They wrap the whole application (not single routes), so a route added later is covered too, and
unknown paths answer 401 rather than revealing which routes exist. Nothing a client sends reaches the
log unescaped: paths and methods go through :func:`clean`, and a request refused for its key is logged
as one fixed-shape line.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections import Counter
from typing import Any

from ft.server.config import ServerConfig
from ft.server.errors import error_body

OPEN_PATHS = frozenset({"/health"})
BODY_READ_TIMEOUT_S = 30.0
DRAIN_BYTES = 16 << 20

RETRY_AFTER_S = 1
LOG_FIELD_CHARS = 200

access_log = logging.getLogger("ft.server.access")
log = logging.getLogger("ft.server")

Scope = dict[str, Any]


async def send_json(
    send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def clean(text: str, limit: int = LOG_FIELD_CHARS) -> str:
    """``text`` safe for a one-line log: control characters (newline, CR, NUL, ESC, C1, line separators),
    backslashes and quotes escaped, long text cut."""
    out = []
    for ch in text[:limit]:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0 or ch in "\u2028\u2029":
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        elif ch in '\\"':
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out) + ("…" if len(text) > limit else "")


def _host_name(value: bytes) -> str:
    """The host part of a Host header (without the port; IPv6 without its brackets)."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def loopback_host_header(value: bytes) -> bool:
    """The Host header names this machine: localhost (or *.localhost) or a loopback address."""
    name = _host_name(value).rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """True when ``host`` can only be reached from this machine (every address it resolves to is loopback)."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if name == "":
        return False  # an empty host means every interface
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


class BearerAuth:
    """Every path except /health needs ``Authorization: Bearer <key>``, compared in constant time."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        # compare_digest takes time independent of where the first difference is.
        if not hmac.compare_digest(given, self._key):
            scope.setdefault("state", {})["ft_refused"] = "key"
            await send_json(
                send,
                401,
                error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <serve_api_key>'",
                    "authentication_error",
                    "invalid_api_key",
                ),
                {"WWW-Authenticate": "Bearer"},
            )
            return
        await self.app(scope, receive, send)


class HostGuard:
    """Without an API key, only requests whose Host header names this machine are answered (403 otherwise).

    A web page on another site can make a browser send requests to 127.0.0.1 under its own domain name
    (DNS rebinding); such requests carry that domain in Host and are refused.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
        if not loopback_host_header(host):
            scope.setdefault("state", {})["ft_refused"] = "host"
            return await send_json(
                send,
                403,
                error_body(
                    "this server has no API key and answers only requests addressed to localhost "
                    "(Host header); set serve_api_key to serve other names",
                    "permission_error",
                    "host_not_allowed",
                ),
            )
        await self.app(scope, receive, send)


class ClientLimits:
    """At most ``per_client`` requests in progress per client address; more get 429 with Retry-After."""

    def __init__(self, app: Any, per_client: int):
        self.app = app
        self.per_client = per_client
        self.active: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("-", 0))[0]
        if self.active[client] >= self.per_client:
            log.warning("client %s is over its limit of %d requests in progress", client, self.per_client)
            return await send_json(
                send,
                429,
                error_body(
                    f"too many requests in progress from this client (limit {self.per_client}); retry shortly",
                    "rate_limit_error",
                    "client_limit",
                ),
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self.active[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active[client] -= 1
            if self.active[client] <= 0:
                del self.active[client]


class BodyLimit:
    """Reads the whole request body first (bounded in size and time), then hands it to the app.

    Bigger than ``max_bytes`` → 413 (read to the end and dropped when not far bigger, so the client sees
    the answer); slower than the timeout → 408.
    """

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = BODY_READ_TIMEOUT_S):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_body(
            f"request body larger than {self.max_bytes} bytes", "invalid_request_error", "body_too_large"
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await send_json(
                        send, 400, error_body("bad Content-Length", "invalid_request_error")
                    )
                if declared > max(DRAIN_BYTES, 4 * self.max_bytes):
                    return await send_json(send, 413, too_big, {"Connection": "close"})
        chunks: list[bytes] = []
        size = 0
        # A body somewhat over the limit is read and dropped, so the client (still sending) sees the 413
        # instead of a reset connection; a far bigger one is cut off.
        drain_limit = max(DRAIN_BYTES, 4 * self.max_bytes)
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    more = message.get("more_body", False)
                    if size > self.max_bytes:
                        chunks.clear()
                        if size > drain_limit:
                            return await send_json(send, 413, too_big, {"Connection": "close"})
                        if not more:
                            return await send_json(send, 413, too_big)
                        continue
                    chunks.append(chunk)
                    if not more:
                        break
        except TimeoutError:
            return await send_json(
                send,
                408,
                error_body("request body not received in time", "invalid_request_error"),
                {"Connection": "close"},
            )
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a server would

        await self.app(scope, replay, send)


class AccessLog:
    """One log line per request: status, latency, and (for generations) tokens and tokens/s.

    Never logs headers or bodies, so neither keys nor prompts end up in the log. Method and path are
    escaped (:func:`clean`); a request refused for its key or Host is one fixed-shape line without them.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 0
        scope.setdefault("state", {})

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            dt = time.perf_counter() - t0
            client = clean(str((scope.get("client") or ("-", 0))[0]), 64)
            refused = scope["state"].get("ft_refused")
            if refused:
                access_log.info(
                    "%s refused (%s) %s %.3fs",
                    client,
                    "no valid API key" if refused == "key" else "Host not allowed",
                    status,
                    dt,
                )
            else:
                usage = scope["state"].get("ft_usage")
                extra = ""
                if usage:
                    extra = (
                        f" model={clean(usage['model'])} prompt_tokens={usage['prompt_tokens']}"
                        f" completion_tokens={usage['completion_tokens']} cached_tokens={usage['cached_tokens']}"
                        f" ttft={usage['ttft_s']:.3f}s tok/s={usage['tps']:.1f} finish={usage['finish_reason']}"
                    )
                access_log.info(
                    '%s "%s %s" %s %.3fs%s',
                    client,
                    clean(str(scope.get("method", "")), 16),
                    clean(str(scope.get("path", ""))),
                    status or 499,
                    dt,
                    extra,
                )


def guard(app: Any, config: ServerConfig) -> AccessLog:
    """``app`` inside the middleware ``config`` asks for. Outermost first when a request arrives: log,
    Host check (no key), per-client limit, CORS, auth, body limit, then the routes."""
    wrapped: Any = BodyLimit(app, config.max_body_bytes)
    if config.api_key is not None:
        wrapped = BearerAuth(wrapped, config.api_key.get_secret_value())
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        wrapped = CORSMiddleware(
            wrapped,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    wrapped = ClientLimits(wrapped, config.max_client_requests)
    if config.api_key is None:
        wrapped = HostGuard(wrapped)
    return AccessLog(wrapped)
