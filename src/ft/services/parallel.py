"""The training service's side of data parallelism (the math is in :mod:`ft.engine.distributed`).

Rank 0 opens the run (dataset, run folder, snapshot, registry, resume) and then tells the other ranks
which run and dataset version it opened; they load the same model and data and train in step with it,
writing nothing. Only rank 0 has callbacks: metrics, logs, plots, checkpoints and the registry.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ft.engine import distributed
from ft.engine.distributed import DataParallel, peer_lost
from ft.engine.trainer import TrainOptions
from ft.errors import ErrorCode, FtError

BACKEND_ENV = "FT_DISTRIBUTED_BACKEND"  # set by ft's launcher: the backend the ranks were started for

__all__ = ["join", "lead", "record_ranks", "follower_options", "lost", "peer_lost"]


def join() -> DataParallel | None:
    """This process's rank when it was started as one of several (by `ft train --nproc`, mlx.launch, mpirun)."""
    if not distributed.launched():
        return None
    try:
        return distributed.init(os.environ.get(BACKEND_ENV, "auto"))
    except RuntimeError as e:
        raise FtError(
            ErrorCode.ENVIRONMENT,
            f"could not join the other ranks of this run: {e}",
            "start the ranks with ft train --nproc N (one host) or --hostfile FILE; check the hosts and ports",
        ) from None


def lead(dp: DataParallel, run: Any) -> None:
    """Rank 0, after opening ``run``: tell the other ranks which run and dataset, and use the ranks."""
    s = run.s
    dp.share_text(f"{run.run_id}\n{s.dataset.name}@v{s.dataset.version}")
    s.options = dataclasses.replace(s.options, parallel=dp)


def record_ranks(run: Any, size: int, note: Callable[[str], None]) -> None:
    """Keep the number of ranks in the run's record and plan; a resume with another number says so."""
    before = run.record.ranks or 1
    if run.res is not None and before != size:
        note(
            f"resumed with {size} rank(s) where the run had {before}: the same examples in the same order in every "
            "step; the updates differ from before only by the order in which gradients are added"
        )
    run.record.ranks = size if size > 1 else None
    run.plan.ranks = size


def follower_options(options: TrainOptions, dp: DataParallel) -> TrainOptions:
    """A rank other than 0 trains with the ranks and generates no sample completions (rank 0 logs them)."""
    return dataclasses.replace(options, parallel=dp, sample_prompts=())


def lost(dp: DataParallel, run_id: str, step: int, latest: str | None) -> FtError:
    """Another rank ended (killed, crashed): this one ends too, with the rank and host that noticed."""
    return FtError(
        ErrorCode.RANK_LOST,
        f"run {run_id}: another rank stopped (killed or crashed) during step {step + 1}; {dp.where()} "
        f"ends too" + (f"; last checkpoint: {latest} (intact)" if latest else ""),
        f"see the other ranks' logs (runs/.ranks/), then continue with: ft train --resume {run_id} --nproc {dp.size}",
    )
