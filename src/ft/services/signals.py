"""SIGINT/SIGTERM during `ft train`: the first one finishes the step, saves and stops; a second exits at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from ft.engine.callbacks import TrainControl
from ft.engine.trainer import (
    STOP_INTERRUPTED,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- signals
class Signals:
    """SIGINT/SIGTERM: the first finishes the step, saves and stops; a second exits at once.

    Only in the main thread (Python delivers signals there); the previous handlers come back on exit.
    ``on_second`` runs before the immediate exit (the registry is marked; checkpoints are atomic, so
    the previous one is never damaged, and a half-written one is only a temporary folder).
    """

    def __init__(
        self, control: TrainControl, on_first: Callable[[int], None], on_second: Callable[[int], None]
    ):
        self.control, self.on_first, self.on_second = control, on_first, on_second
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            self.control.stop(STOP_INTERRUPTED)
            self.on_first(signum)
            return
        try:
            self.on_second(signum)
        finally:
            os._exit(128 + signum)

    def __exit__(self, *_exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
