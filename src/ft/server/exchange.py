"""One generation from request to answer: queue the job, wait for the worker, then answer whole or stream.

A client that disconnects stops its generation, streaming or not; a request past its deadline is 504
(or, once a stream has begun, an error event). Every finished or aborted generation leaves its usage in
``request.state.ft_usage`` for the access log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ft.server.errors import ApiError, error_body
from ft.server.generation import Delta, Finished, TokenLogprob
from ft.server.scheduler import Failed, Job, Started
from ft.server.schemas import _Sampling
from ft.server.shapes import Answer, sse
from ft.server.source import LoadedModel, ModelInfo
from ft.server.state import ServerState

log = logging.getLogger("ft.server")
prompt_log = logging.getLogger("ft.server.prompts")


async def next_event(state: ServerState, job: Job) -> Any:
    remaining = job.deadline - time.monotonic()
    try:
        return await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.001) + 1.0)
    except TimeoutError:
        job.cancel("timeout")
        raise state.timeout_error() from None


async def _started(state: ServerState, job: Job) -> Started:
    first = await next_event(state, job)
    if isinstance(first, Failed):
        raise first.error
    assert isinstance(first, Started)
    return first


def _record(request: Request, started: Started, fin: Finished) -> dict[str, Any]:
    """The answer's ``usage``; the access log's fields go to ``request.state.ft_usage``."""
    request.state.ft_usage = {
        "model": started.model,
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "cached_tokens": fin.cached_tokens,
        "ttft_s": fin.ttft_s,
        "tps": fin.generation_tps,
        "finish_reason": fin.finish_reason,
    }
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
    }


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client goes away (the body is read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel("cancelled")
            return


async def answer(
    request: Request,
    state: ServerState,
    req: _Sampling,
    info: ModelInfo,
    plan: Callable[[LoadedModel], Any],
    shape: Answer,
) -> Any:
    """Generate for ``req`` on ``info`` (``plan`` builds the prompt on the worker), answered in ``shape``."""
    job = state.submit(info, plan)
    # Waiting for the worker (and, without streaming, for the whole answer): a client that leaves
    # meanwhile cancels the job. A stream is watched by the streaming response itself later.
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        start = await _started(state, job)
    except BaseException:
        job.cancel()
        watcher.cancel()
        raise
    if req.stream:
        watcher.cancel()
        return StreamingResponse(
            _events(request, state, req, job, start, shape),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        return await _whole(request, state, req, job, start, shape)
    finally:
        job.cancel()  # no-op when finished; stops the worker when this handler was cancelled
        watcher.cancel()


async def _whole(
    request: Request, state: ServerState, req: _Sampling, job: Job, start: Started, shape: Answer
) -> Any:
    want_logprobs = req.logprob_settings()[0]
    texts: list[str] = []
    entries: list[TokenLogprob] = []
    while True:
        ev = await next_event(state, job)
        if isinstance(ev, Delta):
            texts.append(ev.text)
            entries += ev.logprobs
        elif isinstance(ev, Finished):
            if ev.finish_reason == "timeout":
                raise state.timeout_error()
            usage = _record(request, start, ev)
            if ev.finish_reason == "cancelled":  # the client left: nobody reads this answer
                return JSONResponse(
                    error_body("the client closed the request", "invalid_request_error", "cancelled"),
                    status_code=499,
                )
            if state.config.log_prompts:
                prompt_log.info("completion for %s: %r", start.model, "".join(texts))
            return shape.whole("".join(texts), ev.finish_reason, usage, entries if want_logprobs else None)
        elif isinstance(ev, Failed):
            raise ev.error


async def _events(
    request: Request, state: ServerState, req: _Sampling, job: Job, start: Started, shape: Answer
) -> AsyncIterator[str]:
    want_logprobs = req.logprob_settings()[0]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    sent = 0
    done = False
    filt = shape.make_filter()
    try:
        opening = shape.opening()
        if opening is not None:
            yield sse(opening)
        while True:
            try:
                ev = await next_event(state, job)
            except ApiError as e:
                yield sse(e.body())
                break
            if isinstance(ev, Delta):
                sent += ev.tokens
                text = filt.feed(ev.text) if filt is not None else ev.text
                entries = ev.logprobs if want_logprobs else []
                if text or entries or filt is None:
                    yield sse(shape.chunk(text, None, entries))
            elif isinstance(ev, Finished):
                done = True
                usage = _record(request, start, ev)
                if ev.finish_reason == "timeout":
                    yield sse(error_body("the request timed out", "timeout", "timeout"))
                    break
                finish = ev.finish_reason
                if filt is not None:
                    extra, finish = filt.close(finish)
                    for piece in extra:
                        yield sse(piece)
                yield sse(shape.chunk(None, finish, []))
                if include_usage:
                    yield sse({**shape.chunk(None, None, []), "choices": [], "usage": usage})
                break
            elif isinstance(ev, Failed):
                done = True
                yield sse(ev.error.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away or we are done: either way the worker may stop
        if not done:
            aborted = Finished("aborted", start.prompt_tokens, sent, 0, 0.0, 0.0)
            _record(request, start, aborted)
            log.info("%s: stream aborted by the client after %d completion tokens", start.model, sent)
