"""POST /v1/chat/completions and POST /v1/completions: the request becomes a plan the worker runs with
the loaded model (prompt tokens and sampling settings); :func:`ft.server.exchange.answer` does the rest."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request

from ft.server.errors import ApiError
from ft.server.exchange import answer
from ft.server.generation import SamplingParams, chat_prompt, text_prompt
from ft.server.routes import RouteGroup
from ft.server.schemas import ChatCompletionRequest, CompletionRequest
from ft.server.shapes import ChatAnswer, CompletionAnswer
from ft.server.source import LoadedModel
from ft.server.state import State

prompt_log = logging.getLogger("ft.server.prompts")

routes = RouteGroup()


@routes.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, state: State) -> Any:
    info = state.pick_model(req.model)
    with_tools = req.uses_tools()
    messages = (
        req.openai_messages()
        if with_tools
        else [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
    )
    tools = req.active_tools()
    if state.config.log_prompts:
        prompt_log.info("chat for %s: %r tools: %r", info.id, messages, tools)
    shape = ChatAnswer(info.id)

    def plan(lm: LoadedModel) -> tuple[list[int], SamplingParams]:
        if with_tools:
            if lm.tools is None:
                raise ApiError(
                    400,
                    f"model {lm.info.id!r} has no chat template, so it cannot be given tools",
                    code="tools_unsupported",
                    param="tools",
                )
            try:
                prompt = lm.tools.render(messages, tools)
            except ValueError as e:
                raise ApiError(400, f"tool conversation refused: {e}", param="messages") from None
            if tools:
                shape.parser = lm.tools  # the answer may hold tool calls
        else:
            prompt = chat_prompt(lm, messages)
        return prompt, state.sampling(req, len(prompt), lm, state.config.max_tokens_default)

    return await answer(request, state, req, info, plan, shape)


@routes.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, state: State) -> Any:
    info = state.pick_model(req.model)
    if state.config.log_prompts:
        prompt_log.info("completion prompt for %s: %r", info.id, req.prompt)

    def plan(lm: LoadedModel) -> tuple[list[int], SamplingParams]:
        prompt = text_prompt(lm, req.prompt)
        return prompt, state.sampling(req, len(prompt), lm)

    return await answer(request, state, req, info, plan, CompletionAnswer(info.id))
