"""The request queue and the one worker thread that runs every MLX call.

Requests are admitted into a bounded queue (full: 429); the worker takes them in order, makes sure
the request's model is in memory (loading it, which makes new arrivals get 503 meanwhile), then
streams events back to the request's asyncio queue. One worker: on a CPU or a single GPU, running
two generations at once would only make both slower, and MLX state stays on one thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ft.errors import FtError
from ft.server.errors import ApiError
from ft.server.generation import Delta, Finished, SamplingParams, generate
from ft.server.pool import ModelPool
from ft.server.source import LoadedModel, ModelInfo

log = logging.getLogger("ft.server")


@dataclass
class Started:
    """The request passed the checks that need the model (prompt length, vocabulary) and generation begins."""

    model: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class Failed:
    error: ApiError


Event = Started | Delta | Finished | Failed
# Runs on the worker with the loaded model: returns the prompt token ids and the sampling parameters.
Plan = Callable[[LoadedModel], tuple[list[int], SamplingParams]]


@dataclass
class Job:
    model: ModelInfo
    plan: Plan
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() by which the job must be done
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    _stop: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        self._stop = self._stop or reason

    def stop_reason(self) -> str | None:
        if self._stop:
            return self._stop
        if time.monotonic() > self.deadline:
            return "timeout"
        return None

    def post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
            pass


@dataclass
class _Load:
    model: ModelInfo
    on_error: Callable[[Exception], None]


class Scheduler:
    def __init__(self, pool: ModelPool, max_queue: int):
        self.pool = pool
        self.max_queue = max_queue
        self._q: queue.Queue[Job | _Load | None] = queue.Queue()
        self._lock = threading.Lock()
        self._in_system = 0  # admitted jobs not finished yet (waiting + the one running)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.served = 0

    @property
    def pending(self) -> int:
        return self._in_system

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ft-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Unload the models and idle the worker (it is a daemon thread parked until the process exits).

        The thread is never ended: with MLX 0.32 on Linux, a thread that ran MLX work and then exited
        makes the process abort at exit about one time in three ("terminate called without an active
        exception", from its thread-local state); a parked daemon thread does not.
        """
        if self._thread is not None:
            self._q.put(None)
            self._stopped.wait(timeout)
            self._thread = None

    def preload(self, model: ModelInfo, on_error: Callable[[Exception], None]) -> None:
        """Load ``model`` ahead of any request (at start-up)."""
        self.pool.loading = model.id  # visible at once, before the worker picks it up
        self._q.put(_Load(model, on_error))

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the queue is full (the caller answers 429)."""
        with self._lock:
            if self._in_system >= self.max_queue + 1:
                return False
            self._in_system += 1
        self._q.put(job)
        return True

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                self.pool.clear()
                self._stopped.set()
                threading.Event().wait()  # parked for good: see stop()
            if isinstance(item, _Load):
                try:
                    self.pool.get(item.model)
                except Exception as e:
                    self.pool.loading = None
                    item.on_error(e)
                continue
            try:
                self._serve(item)
            finally:
                with self._lock:
                    self._in_system -= 1

    def _serve(self, job: Job) -> None:
        reason = job.stop_reason()
        if reason:  # waited too long in the queue, or the client went away
            job.post(
                Failed(ApiError(504, "the request timed out while queued", type="timeout", code="timeout"))
            )
            return
        try:
            lm = self.pool.get(job.model)
        except FtError as e:
            log.error("could not load %s: %s", job.model.id, e.message)
            job.post(
                Failed(
                    ApiError(
                        500,
                        f"could not load model {job.model.id!r}: {e.message}",
                        type="server_error",
                        code="model_load_failed",
                    )
                )
            )
            return
        except Exception as e:
            log.exception("could not load %s", job.model.id)
            job.post(
                Failed(
                    ApiError(
                        500,
                        f"could not load model {job.model.id!r}: {type(e).__name__}",
                        type="server_error",
                        code="model_load_failed",
                    )
                )
            )
            return
        try:
            prompt, params = job.plan(lm)
            job.post(Started(job.model.id, len(prompt), params.max_tokens))
            for event in generate(lm, prompt, params, job.stop_reason):
                job.post(event)
                if isinstance(event, Finished) and event.finish_reason in ("cancelled", "timeout"):
                    log.info(
                        "%s: generation stopped (%s) after %d tokens",
                        job.model.id,
                        event.finish_reason,
                        event.completion_tokens,
                    )
            self.served += 1
        except ApiError as e:
            job.post(Failed(e))
        except Exception as e:  # a bug or an MLX failure: the server stays up, the request gets a 500
            log.exception("generation failed for %s", job.model.id)
            job.post(Failed(ApiError(500, f"generation failed: {type(e).__name__}", type="server_error")))
