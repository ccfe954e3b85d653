"""What the routes of `ft serve` share: the settings, the model directory, the pool and the scheduler.

One :class:`ServerState` per application (``app.state.ft``); a route gets it with the ``State`` dependency.
It also holds the steps every generation takes before it reaches the worker: which model, how many
tokens, and the admission checks (a model loading: 503; the queue full: 429).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from ft.server.config import ServerConfig
from ft.server.errors import ApiError
from ft.server.generation import SamplingParams, check_bias, token_budget
from ft.server.pool import ModelPool
from ft.server.scheduler import Job, Scheduler
from ft.server.schemas import _Sampling
from ft.server.source import LoadedModel, ModelInfo, ModelSource

MODELS_TTL_S = 1.0  # how long a listing of the workspace's models is reused
RETRY_AFTER_LOADING_S = 2


class ModelDirectory:
    """The servable models by id, re-read from the workspace at most once per MODELS_TTL_S."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._at = 0.0
        self._models: dict[str, ModelInfo] = {}

    def all(self) -> dict[str, ModelInfo]:
        now = time.monotonic()
        if now - self._at > MODELS_TTL_S:
            self._models = {m.id: m for m in self.source.models()}
            self._at = now
        return self._models

    def find(self, model_id: str) -> ModelInfo:
        models = self.all()
        if model_id not in models:
            shown = model_id if len(model_id) <= 80 else model_id[:80] + "…"
            raise ApiError(
                404,
                f"model {shown!r} not found; available: {', '.join(models) or '(none)'}",
                code="model_not_found",
                param="model",
            )
        return models[model_id]


@dataclass
class ServerState:
    config: ServerConfig
    directory: ModelDirectory
    pool: ModelPool
    scheduler: Scheduler

    @classmethod
    def build(cls, config: ServerConfig, source: ModelSource) -> ServerState:
        pool = ModelPool(source, config.max_models)
        scheduler = Scheduler(pool, config.max_queue, config.max_batch, config.prefill_chunk)
        return cls(config, ModelDirectory(source), pool, scheduler)

    def pick_model(self, name: str | None) -> ModelInfo:
        """The model a request names, else the default one, else the only one there is."""
        if name is None:
            if self.config.default_model:
                name = self.config.default_model
            else:
                listed = self.directory.all()
                if len(listed) != 1:
                    raise ApiError(
                        400, f"say which model: one of {', '.join(listed) or '(none)'}", param="model"
                    )
                name = next(iter(listed))
        return self.directory.find(name)

    def sampling(
        self, req: _Sampling, prompt_len: int, lm: LoadedModel, default_limit: int | None = None
    ) -> SamplingParams:
        """The request's sampling settings, its token budget bounded by the context and the server's cap."""
        check_bias(lm, req.bias())
        logprobs, top = req.logprob_settings()
        limit = req.token_limit()
        return SamplingParams(
            max_tokens=token_budget(
                lm, prompt_len, default_limit if limit is None else limit, self.config.max_tokens
            ),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(req.stops()),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.bias(),
            logprobs=logprobs,
            top_logprobs=top,
        )

    def submit(self, info: ModelInfo, plan: Callable[[LoadedModel], Any]) -> Job:
        """Queue a generation on ``info`` (503 while a model loads, 429 when the queue is full)."""
        if self.pool.loading is not None:
            raise ApiError(
                503,
                f"model {self.pool.loading!r} is loading; retry in a few seconds",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": str(RETRY_AFTER_LOADING_S)},
            )
        base = self.directory.find(info.base) if info.kind == "tuned" and info.base else None
        deadline = time.monotonic() + self.config.request_timeout
        job = Job(info, plan, asyncio.get_running_loop(), deadline, base)
        if not self.scheduler.submit(job):
            raise ApiError(
                429,
                f"the server is busy ({self.scheduler.pending} requests in progress or queued); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        return job

    def timeout_error(self) -> ApiError:
        return ApiError(
            504,
            f"the request took longer than {self.config.request_timeout:g}s",
            type="timeout",
            code="timeout",
        )


async def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.ft
    return state


State = Annotated[ServerState, Depends(_state)]
"""A route parameter ``state: State`` is the application's :class:`ServerState`."""
