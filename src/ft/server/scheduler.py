"""The request queue and the one worker thread that runs every MLX call, with continuous batching.

Requests are admitted into a bounded system (``max_batch`` generating + ``max_queue`` waiting; more get
429). The worker takes waiting requests in order, makes sure the request's model is in memory (loading
a base model makes new arrivals get 503 meanwhile; a tuned run of a loaded base is attached to it
without a reload), and adds them to that model's :class:`~ft.server.batching.Lane`. Between additions
it steps every lane: one decoding step for all requests generating on that model plus one prompt
chunk. Requests whose client went away or whose time ran out leave the batch before the next step.
MLX state stays on this one thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import EllipsisType

from ft.errors import FtError
from ft.server.batching import Lane
from ft.server.errors import ApiError
from ft.server.generation import Delta, Finished, SamplingParams
from ft.server.pool import ModelPool
from ft.server.source import LoadedModel, ModelInfo

log = logging.getLogger("ft.server")

DEFAULT_MAX_BATCH = 16
DEFAULT_PREFILL_CHUNK = 512


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
    base: ModelInfo | None = None  # the base model of a tuned ``model`` (None: ``model`` is a base)
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


def _load_failed(job: Job, e: Exception) -> ApiError:
    if isinstance(e, FtError):
        log.error("could not load %s: %s", job.model.id, e.message)
        detail = e.message
    else:
        log.exception("could not load %s", job.model.id)
        detail = type(e).__name__
    return ApiError(
        500, f"could not load model {job.model.id!r}: {detail}", type="server_error", code="model_load_failed"
    )


class Scheduler:
    def __init__(
        self,
        pool: ModelPool,
        max_queue: int,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        self.pool = pool
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.prefill_chunk = prefill_chunk
        self._q: queue.Queue[Job | _Load | None] = queue.Queue()
        self._lock = threading.Lock()
        self._in_system = 0  # admitted jobs not finished yet (waiting + generating)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._waiting: deque[Job] = deque()
        self._lanes: dict[int, Lane] = {}  # by id() of the LoadedModel
        self._jobs: dict[int, int] = {}  # in-flight jobs per id() of the LoadedModel
        self.served = 0
        self.largest_batch = 0  # the most requests decoded together so far (tests, bench)
        pool.in_use = lambda lm: self._jobs.get(id(lm), 0) > 0
        pool.on_unload = self._forget

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
        """Queue ``job``; False when the system is full (the caller answers 429)."""
        with self._lock:
            if self._in_system >= self.max_queue + self.max_batch:
                return False
            self._in_system += 1
        self._q.put(job)
        return True

    # -- the worker ------------------------------------------------------------------------------
    def _done(self, job: Job, lm: LoadedModel | None = None) -> None:
        with self._lock:
            self._in_system -= 1
        if lm is not None:
            self._jobs[id(lm)] -= 1

    def _forget(self, lm: LoadedModel) -> None:
        lane = self._lanes.pop(id(lm), None)
        if lane is not None:
            lane.close()
        self._jobs.pop(id(lm), None)

    def _run(self) -> None:
        item: Job | _Load | None | EllipsisType
        while True:
            busy = bool(self._waiting) or any(len(lane) for lane in self._lanes.values())
            try:
                item = self._q.get_nowait() if busy else self._q.get()
            except queue.Empty:
                item = ...
            while item is not ...:
                if item is None:
                    self._shutdown()
                if isinstance(item, _Load):
                    try:
                        self.pool.get(item.model, item.model)
                    except Exception as e:
                        self.pool.loading = None
                        item.on_error(e)
                elif isinstance(item, Job):
                    self._waiting.append(item)
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = ...
            self._admit()
            if self._waiting and not any(len(lane) for lane in self._lanes.values()):
                time.sleep(0.01)  # waiting for a model that cannot be loaded yet: do not spin
            self._step()

    def _shutdown(self) -> None:
        for job in self._waiting:
            job.post(Failed(ApiError(503, "the server is shutting down", type="server_error")))
        for lane in self._lanes.values():
            for sink in lane.fail_all():
                sink.post(Failed(ApiError(503, "the server is shutting down", type="server_error")))
        self._lanes.clear()
        self.pool.clear()
        self._stopped.set()
        threading.Event().wait()  # parked for good: see stop()

    def _admit(self) -> None:
        """Move waiting jobs into their model's batch, in arrival order, while there is room."""
        while self._waiting:
            job = self._waiting[0]
            reason = job.stop_reason()
            if reason:  # waited too long, or the client went away
                self._waiting.popleft()
                job.post(
                    Failed(
                        ApiError(504, "the request timed out while queued", type="timeout", code="timeout")
                    )
                )
                self._done(job)
                continue
            try:
                lm = self.pool.get(job.model, job.base or job.model)
            except Exception as e:
                self._waiting.popleft()
                job.post(Failed(_load_failed(job, e)))
                self._done(job)
                continue
            if lm is None:
                return  # its model cannot be loaded until a busy one is done: keep the order
            lane = self._lanes.get(id(lm))
            if lane is not None and len(lane) >= self.max_batch:
                return
            self._waiting.popleft()
            try:
                prompt, params = job.plan(lm)
                if lane is None:
                    lane = self._lanes[id(lm)] = Lane(lm, self.max_batch, self.prefill_chunk)
                job.post(Started(job.model.id, len(prompt), params.max_tokens))
                lane.add(job, prompt, params)
            except ApiError as e:
                job.post(Failed(e))
                self._done(job)
                continue
            except Exception as e:  # a bug or an MLX failure: the server stays up, the request gets a 500
                log.exception("could not start generation for %s", job.model.id)
                job.post(Failed(ApiError(500, f"generation failed: {type(e).__name__}", type="server_error")))
                self._done(job)
                continue
            self._jobs[id(lm)] = self._jobs.get(id(lm), 0) + 1

    def _step(self) -> None:
        for key, lane in list(self._lanes.items()):
            if not len(lane):
                continue
            self.largest_batch = max(self.largest_batch, len(lane))
            try:
                finished = lane.step()
            except Exception as e:  # a bug or an MLX failure: these requests get a 500, the server stays up
                log.exception("generation failed for %s", lane.lm.info.id)
                error = ApiError(500, f"generation failed: {type(e).__name__}", type="server_error")
                for sink in lane.fail_all():
                    sink.post(Failed(error))
                    self._done(sink, lane.lm)  # type: ignore[arg-type]
                self._lanes.pop(key, None)
                continue
            for fin, job in finished:
                if fin.finish_reason in ("cancelled", "timeout"):
                    log.info(
                        "%s: generation stopped (%s) after %d tokens",
                        lane.lm.info.id,
                        fin.finish_reason,
                        fin.completion_tokens,
                    )
                else:
                    self.served += 1
                self._done(job, lane.lm)
