"""ASGI middleware for what must hold on every route: the access log, the API key, the body size limit.

They wrap the whole application (not single routes), so a route added later is covered too, and
unknown paths answer 401 rather than revealing which routes exist.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import time
from typing import Any

from ft.server.errors import error_body

OPEN_PATHS = frozenset({"/health"})
BODY_READ_TIMEOUT_S = 30.0
DRAIN_BYTES = 16 << 20

access_log = logging.getLogger("ft.server.access")

Scope = dict[str, Any]


async def send_json(
    send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


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
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


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

    Never logs headers or bodies, so neither keys nor prompts end up in the log.
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
            usage = scope["state"].get("ft_usage")
            client = scope.get("client") or ("-", 0)
            extra = ""
            if usage:
                extra = (
                    f" model={usage['model']} prompt_tokens={usage['prompt_tokens']}"
                    f" completion_tokens={usage['completion_tokens']} cached_tokens={usage['cached_tokens']}"
                    f" ttft={usage['ttft_s']:.3f}s tok/s={usage['tps']:.1f} finish={usage['finish_reason']}"
                )
            access_log.info(
                '%s "%s %s" %s %.3fs%s', client[0], scope["method"], scope["path"], status or 499, dt, extra
            )
