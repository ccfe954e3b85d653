"""Models in memory: at most ``capacity`` base models at once, the least recently used idle one unloaded first.

A base model and its tuned variants form one group that holds ONE copy of the base weights: a tuned
variant is the base's module tree with adapter layers on top, sharing every base array
(:meth:`ModelSource.adapt`). So a client asking for the base and another asking for a tuned run of it
never make the server reload anything. Variants are cheap (the adapters only); up to
``MAX_VARIANTS`` per group are kept, least recently used dropped first.

Used only from the worker thread (MLX work stays on one thread); other threads read
:attr:`ModelPool.loading` and :meth:`ModelPool.loaded_ids`, which are plain attribute reads.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ft.server.source import LoadedModel, ModelInfo, ModelSource

log = logging.getLogger("ft.server")

MAX_VARIANTS = 8  # tuned variants kept per base model


@dataclass
class _Group:
    base: LoadedModel
    variants: OrderedDict[str, LoadedModel] = field(default_factory=OrderedDict)

    def members(self) -> list[LoadedModel]:
        return [self.base, *self.variants.values()]


class ModelPool:
    def __init__(self, source: ModelSource, capacity: int = 1):
        self.source = source
        self.capacity = max(1, capacity)
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        self.loading: str | None = None
        self.loads = 0  # how many base models were loaded (tests and /health report it)
        # Set by the scheduler: whether a loaded model has requests in flight (then it is not unloaded).
        self.in_use: Callable[[LoadedModel], bool] = lambda lm: False
        # Called with every model dropped from memory (the scheduler forgets its batch).
        self.on_unload: Callable[[LoadedModel], None] = lambda lm: None

    def loaded_ids(self) -> list[str]:
        return [lm.info.id for g in self._groups.values() for lm in g.members()]

    def get(self, info: ModelInfo, base: ModelInfo) -> LoadedModel | None:
        """The loaded model for ``info`` (``base``: its base model's entry; ``info`` itself for a base).

        None when it cannot be loaded now because every loaded model is busy (the caller retries later).
        """
        group = self._groups.get(base.id)
        if group is not None and group.base.info.fingerprint != base.fingerprint:
            # What the name points at changed on disk: the loaded copy is stale.
            if any(self.in_use(m) for m in group.members()):
                return None
            self._unload(base.id)
            group = None
        if group is None:
            # Unload before loading, so peak memory holds `capacity` models, not one more.
            while len(self._groups) >= self.capacity:
                idle = [k for k, g in self._groups.items() if not any(self.in_use(m) for m in g.members())]
                if not idle:
                    return None
                self._unload(idle[0])
            group = _Group(self._load(base, lambda: self.source.load(base)))
            self._groups[base.id] = group
        self._groups.move_to_end(base.id)
        if info.kind == "base":
            return group.base
        key = info.load_key
        lm = group.variants.get(key)
        if lm is not None and lm.info.fingerprint != info.fingerprint:
            if self.in_use(lm):
                return None
            self._drop_variant(group, key)
            lm = None
        if lm is None:
            while len(group.variants) >= MAX_VARIANTS:
                idle = [k for k, v in group.variants.items() if not self.in_use(v)]
                if not idle:
                    return None
                self._drop_variant(group, idle[0])
            t0 = time.perf_counter()
            lm = self.source.adapt(group.base, info)
            log.info("attached %s to %s in %.2fs", info.id, base.id, time.perf_counter() - t0)
            group.variants[key] = lm
        group.variants.move_to_end(key)
        return lm

    def _load(self, info: ModelInfo, load: Callable[[], LoadedModel]) -> LoadedModel:
        self.loading = info.id
        t0 = time.perf_counter()
        try:
            lm = load()
        finally:
            self.loading = None
        self.loads += 1
        log.info("loaded %s in %.1fs", info.id, time.perf_counter() - t0)
        return lm

    def _drop_variant(self, group: _Group, key: str) -> None:
        lm = group.variants.pop(key)
        self.on_unload(lm)
        log.info("detached %s", lm.info.id)

    def _unload(self, key: str) -> None:
        group = self._groups.pop(key, None)
        if group is not None:
            for lm in group.members():
                self.on_unload(lm)
        del group
        gc.collect()
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:  # clearing the allocator cache is an optimisation only
            pass
        log.info("unloaded %s", key)

    def clear(self) -> None:
        for key in list(self._groups):
            self._unload(key)
