"""Models in memory: at most ``capacity`` at once, the least recently used unloaded first.

Used only from the worker thread (MLX work stays on one thread); other threads read
:attr:`ModelPool.loading` and :meth:`ModelPool.loaded_ids`, which are plain attribute reads.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict

from ft.server.source import LoadedModel, ModelInfo, ModelSource

log = logging.getLogger("ft.server")


class ModelPool:
    def __init__(self, source: ModelSource, capacity: int = 1):
        self.source = source
        self.capacity = max(1, capacity)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.loading: str | None = None
        self.loads = 0  # how many loads happened (tests and /health report it)

    def loaded_ids(self) -> list[str]:
        return [lm.info.id for lm in self._models.values()]

    def get(self, info: ModelInfo) -> LoadedModel:
        key = info.load_key
        lm = self._models.get(key)
        if lm is not None and lm.info.fingerprint == info.fingerprint:
            self._models.move_to_end(key)
            return lm
        if lm is not None:  # what the name points at changed on disk (e.g. a run's best checkpoint)
            self._unload(key)
        # Unload before loading, so peak memory holds `capacity` models, not one more.
        while len(self._models) >= self.capacity:
            self._unload(next(iter(self._models)))
        self.loading = info.id
        t0 = time.perf_counter()
        try:
            lm = self.source.load(info)
        finally:
            self.loading = None
        self.loads += 1
        self._models[key] = lm
        log.info("loaded %s in %.1fs", info.id, time.perf_counter() - t0)
        return lm

    def _unload(self, key: str) -> None:
        lm = self._models.pop(key, None)
        model_id = lm.info.id if lm is not None else key
        del lm
        gc.collect()
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:  # clearing the allocator cache is an optimisation only
            pass
        log.info("unloaded %s", model_id)

    def clear(self) -> None:
        for key in list(self._models):
            self._unload(key)
