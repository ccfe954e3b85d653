"""Shared pieces of the `ft ui` tests (no tests here): the real app served by uvicorn on a loopback port."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import uvicorn

from ft.server.run import bind, url_of
from ft.ui.app import UiConfig, create_app
from ft.workspace import Workspace


class UiServer:
    """`ft ui`'s application on 127.0.0.1:<free port>, in a thread of this process."""

    def __init__(self, ws: Workspace, config: UiConfig | None = None):
        self.config = config or UiConfig()
        self.app = create_app(ws, self.config)
        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "ft ui did not start"
            time.sleep(0.02)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    """The job once it has ended (completed, failed, stopped, lost)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s:\n{job['log_tail']}")


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}
