"""Fault injection for ft's own tests: loaded by `ft train` only when ``FT_TEST_HOOK`` is set."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ft.engine.callbacks import TrainControl
from ft.engine.memory import simulate_out_of_memory_above
from ft.errors import ErrorCode, FtError
from ft.workspace.atomic import atomic_write_text

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- test hooks
TEST_HOOK_ENV = "FT_TEST_HOOK"
TEST_MARKER_ENV = "FT_TEST_MARKER"


class TestHooks:
    """Fault injection for ft's own tests, off unless ``FT_TEST_HOOK`` is set (comma-separated):

        ``pause-step:K`` sleeps after step K's update (before its evaluation and save), ``pause-save:K``
        sleeps inside step K's checkpoint save before the folder is renamed, ``nan-steps:A-B`` puts Inf into
        the token embeddings for steps A..B (so their loss and gradients are non-finite), ``oom-step:K``
        fails step K as MLX's allocator does when memory runs out (before its save), ``oom-above:N[:K]``
        makes every micro-batch of more than N positions fail that way inside the step (from step K on: the
        trainer's own recovery, ``training.auto_micro_batch``, sees it). A pause writes
        ``FT_TEST_MARKER`` (so the test knows when to kill) and lasts up to 60 s (a step pause ends early when
    a stop is asked, e.g. by SIGINT).
    """

    def __init__(self, spec: str, marker: str | None, model: Any, control: TrainControl):
        self.model, self.control = model, control
        self.marker = Path(marker) if marker else None
        self.pause_step = self.pause_save = self.oom_step = None
        self.nan: set[int] = set()
        self.oom_above: int | None = None
        self.oom_from = 1
        self._saved_embed: Any = None
        self._step = 0
        for item in filter(None, (x.strip() for x in spec.split(","))):
            kind, _, arg = item.partition(":")
            if kind == "pause-step":
                self.pause_step = int(arg)
            elif kind == "oom-step":
                self.oom_step = int(arg)
            elif kind == "oom-above":
                limit, _, start = arg.partition(":")
                self.oom_above, self.oom_from = int(limit), int(start or 1)
            elif kind == "pause-save":
                self.pause_save = int(arg)
            elif kind == "nan-steps":
                a, _, b = arg.partition("-")
                self.nan = set(range(int(a), int(b or a) + 1))
            else:
                raise FtError(ErrorCode.USAGE, f"{TEST_HOOK_ENV}: unknown hook {item!r}")

    def _pause(self, what: str, until_stop: bool) -> None:
        if self.marker is not None:
            atomic_write_text(self.marker, what + "\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (until_stop and self.control.should_stop):
            time.sleep(0.02)

    def before_rename(self, tmp: Path) -> None:
        # Not ended by a stop request: the save of an interrupted run is paused too (for a second signal).
        if self.pause_save is not None and self._step == self.pause_save:
            self._pause(f"save {self._step} {tmp}", until_stop=False)

    def _embed(self) -> Any:
        return getattr(getattr(self.model, "model", None), "embed_tokens", None)

    def _poison(self, on: bool) -> None:
        import mlx.core as mx

        emb = self._embed()
        if emb is None:
            return
        if on and self._saved_embed is None:
            self._saved_embed = emb.weight
            emb.weight = mx.full(emb.weight.shape, float("inf"), dtype=emb.weight.dtype)
        elif not on and self._saved_embed is not None:
            emb.weight, self._saved_embed = self._saved_embed, None

    def on_train_start(self, e: Any) -> None:
        self._step = e.start_step
        self._poison(e.start_step + 1 in self.nan)
        self._oom(e.start_step + 1)

    def _oom(self, step: int) -> None:
        if self.oom_above is not None and step >= self.oom_from:
            simulate_out_of_memory_above(self.oom_above)

    def on_step(self, e: Any) -> None:
        if self.oom_step == e.step:
            raise RuntimeError(
                f"[metal::malloc] Unable to allocate 1073741824 bytes (simulated: {TEST_HOOK_ENV})"
            )
        self._step = e.step
        if self.pause_step == e.step:
            self._pause(f"step {e.step}", until_stop=True)

    def on_step_end(self, e: Any) -> None:
        self._poison(e.step + 1 in self.nan)
        self._oom(e.step + 1)

    def on_train_end(self, _r: Any) -> None:
        self._poison(False)
        simulate_out_of_memory_above(None)


def from_env(model: Any, control: TrainControl) -> TestHooks:
    """The hooks ``FT_TEST_HOOK`` asks for (with ``FT_TEST_MARKER`` as the marker file)."""
    return TestHooks(os.environ[TEST_HOOK_ENV], os.environ.get(TEST_MARKER_ENV), model, control)
