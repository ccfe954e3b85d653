"""What the server needs from the workspace: a list of servable models and a way to load one.

The server never turns a request's text into a path: a request names a model id, the id is looked up
in :meth:`ModelSource.models`, and only a listed :class:`ModelInfo` is ever given to
:meth:`ModelSource.load`. The serving service implements the protocol over the workspace. Base models are loaded; tuned runs
are built on a loaded base (:meth:`ModelSource.adapt`), so base and tuned share one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict


class ModelInfo(BaseModel):
    """One entry of /v1/models."""

    model_config = ConfigDict(frozen=True)

    id: str
    kind: Literal["base", "tuned"]
    created: int = 0
    base: str | None = None  # for tuned runs: the base model's name
    checkpoint: str | None = None  # for tuned runs: the checkpoint folder served
    run: str | None = None  # for tuned runs: the run id (the id may be the run's name or RUN:CHECKPOINT)
    # Changes when what would be loaded changes (e.g. a run's `best` moves): a loaded copy is then stale.
    fingerprint: str = ""

    @property
    def load_key(self) -> str:
        """Names that load the same weights (a run by id and by name) share one copy in memory."""
        return (
            f"run:{self.run}:{self.checkpoint}"
            if self.kind == "tuned" and self.run
            else f"{self.kind}:{self.id}"
        )


@dataclass
class ToolSupport:
    """How a loaded model takes tools and writes tool calls (built by the serving service from the model's
    chat template: its own tool format, or ft's fallback for templates without one)."""

    style: str  # hermes | mistral | llama3 | fallback (ft.data.toolcalls)
    # OpenAI-shaped messages and tools -> prompt token ids; raises ValueError with a message for the client.
    render: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], list[int]]
    # generated text -> (text outside the calls, calls in OpenAI's form, why a call could not be read).
    parse: Callable[[str], tuple[str | None, list[dict[str, Any]], str | None]]
    markers: tuple[str, ...]  # text that opens a call: a stream holds output back from there


@dataclass
class LoadedModel:
    """A model ready to generate: mlx-lm model and TokenizerWrapper plus what generation needs to know."""

    info: ModelInfo
    model: Any
    tokenizer: Any
    context_length: int | None
    # Renders chat messages to prompt token ids; None: the tokenizer's own chat template.
    format_chat: Callable[[Sequence[dict[str, str]]], list[int]] | None = None
    # Tools in requests and tool calls in answers; None: the model has no chat template to put them in.
    tools: ToolSupport | None = None
    # Generation state kept between requests (the prompt cache); owned by the worker thread.
    state: dict[str, Any] = field(default_factory=dict)


class ModelSource(Protocol):
    def models(self) -> list[ModelInfo]:
        """Everything a request may name, fresh from the workspace."""
        ...

    def load(self, info: ModelInfo) -> LoadedModel:
        """Load a listed base model; raise ft.errors.FtError with a clear message when it cannot be."""
        ...

    def adapt(self, base: LoadedModel, info: ModelInfo) -> LoadedModel:
        """The tuned model ``info`` on top of the loaded ``base``, sharing its weights (not a second copy)."""
        ...
