"""The HTTP connection protocol: uvicorn's h11 protocol with a header timeout and a connection cap.

* A connection must send a complete request head within ``header_timeout`` seconds of opening, and
  again after each response (keep-alive); one that does not (an idle or slow-loris socket) is closed.
  Sending bytes slowly does not reset the clock.
* At most ``max_connections`` connections are open in all and ``per_client`` from one address; past
  either, the longest-idle connection (one with no request in progress; of that address for the
  per-address cap) is closed to make room, so idle sockets never take the place of requests. When every
  such connection has a request in progress the new one gets a JSON 503 with Retry-After.

uvicorn's own ``limit_concurrency`` is not used: it counts idle connections too, so a few hundred idle
sockets would make every real request (``/health`` included) get 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ft.server")

RETRY_AFTER_S = 1


def _busy_response() -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": "the server has too many connections with requests in progress; retry shortly",
                "type": "server_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: {RETRY_AFTER_S}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(header_timeout: float, max_connections: int, per_client: int = 256) -> type[Any]:
    """An h11 protocol class with these limits (uvicorn builds one instance per connection)."""

    class GuardedH11Protocol(H11Protocol):
        _ft_timer: asyncio.TimerHandle | None = None
        _ft_idle_since: float | None = None  # loop time since when no request is in progress

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._ft_arm()
            host = self.client[0] if self.client else None
            conns: list[Any] = list(self.connections)
            mine = [c for c in conns if c.client and c.client[0] == host] if host else []
            for over, pool in (
                (len(self.connections) > max_connections, self.connections),
                (len(mine) > per_client, mine),
            ):
                if not over:
                    continue
                idle: list[Any] = [
                    c for c in pool if c is not self and getattr(c, "_ft_idle_since", None) is not None
                ]
                if idle:
                    oldest = min(idle, key=lambda c: c._ft_idle_since)
                    who = oldest.client[0] if oldest.client else "-"
                    log.info("connection limit reached: closed an idle connection from %s", who)
                    oldest._ft_close()
                else:
                    log.warning("too many connections with requests in progress: refused one from %s", host)
                    transport.write(_busy_response())
                    self._ft_close()
                    return

        def _ft_arm(self) -> None:
            self._ft_disarm()
            self._ft_idle_since = self.loop.time()
            self._ft_timer = self.loop.call_later(header_timeout, self._ft_expire)

        def _ft_disarm(self) -> None:
            if self._ft_timer is not None:
                self._ft_timer.cancel()
                self._ft_timer = None

        def _ft_in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _ft_close(self) -> None:
            self._ft_disarm()
            self._ft_idle_since = None
            if not self.transport.is_closing():
                self.transport.close()

        def _ft_expire(self) -> None:
            self._ft_timer = None
            if not self._ft_in_request():
                self._ft_close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._ft_in_request():
                self._ft_disarm()
                self._ft_idle_since = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self._ft_in_request():  # a pipelined request started at once
                self._ft_disarm()
                self._ft_idle_since = None
            else:
                self._ft_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._ft_disarm()
            self._ft_idle_since = None
            super().connection_lost(exc)

    return GuardedH11Protocol
