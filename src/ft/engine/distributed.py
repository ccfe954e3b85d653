"""Data parallelism over MLX's distributed backend (``mx.distributed``: ring over TCP, MPI, NCCL).

Every rank runs the same planner with the same seed, so all ranks know every optimizer step's
micro-batches; rank ``r`` of ``n`` computes the gradients of micro-batches ``r, r+n, r+2n, ...`` with
their single-process dropout seeds. Each micro-batch's loss is already divided by the whole step's
trained tokens, so the sum over ranks of the summed gradients is the single-process gradient (up to
the order of the additions). One all-reduce per step carries the gradients, the summed loss, the
token count and the objective's auxiliary sums together; every rank then applies the same update
and holds the same weights. Evaluation splits the validation steps the same way.

A rank that dies (killed, out of memory) breaks the ring: the others get an error from their next
collective, which :func:`peer_lost` recognises, and end too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

BACKENDS = ("auto", "ring", "mpi", "nccl")
_TEXT_BYTES = 256


@dataclass
class DataParallel:
    """This process's place among the ranks of one run.

    ``local_stop``/``any_stop``: a stop asked on one rank only (a signal, a callback) rides along with the
    next step's all-reduce, so that every rank stops after the same step.
    """

    group: Any
    rank: int
    size: int
    local_stop: bool = False
    any_stop: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """Indices of this rank's share of ``n`` items (round robin)."""
        return list(range(self.rank, n, self.size))

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    def reduce_step(
        self, grads: Any, loss: mx.array, n_tok: int, aux: mx.array | None, like: Any
    ) -> tuple[Any, mx.array, int, mx.array | None]:
        """Sum a step's gradients (``None``: this rank had no micro-batch), loss, tokens and aux over ranks,
        in one all-reduce of one flat buffer."""
        if grads is None:
            grads = tree_unflatten([(k, mx.zeros_like(v)) for k, v in tree_flatten(like)])
        flat = tree_flatten(grads)
        pieces = [v.reshape(-1).astype(mx.float32) for _, v in flat]
        scalars = [
            mx.array([loss], dtype=mx.float32).reshape(-1),
            mx.array([float(n_tok), float(self.local_stop)], dtype=mx.float32),
        ]
        if aux is not None:
            scalars.append(aux.astype(mx.float32).reshape(-1))
        buf = self.all_sum(mx.concatenate([*pieces, *scalars]))
        out, start = [], 0
        for (k, v), p in zip(flat, pieces, strict=True):
            out.append((k, buf[start : start + p.size].reshape(v.shape).astype(v.dtype)))
            start += p.size
        total_loss = buf[start]
        tokens = int(buf[start + 1].item())
        self.any_stop = bool(buf[start + 2].item() > 0)
        aux_out = buf[start + 3 :] if aux is not None else None
        return tree_unflatten(out), total_loss, tokens, aux_out

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Sum a few numbers over the ranks (evaluation totals), in float64 on the host side."""
        got = self.all_sum(mx.array(np.asarray(values, dtype=np.float32)))
        return [float(v) for v in np.array(got, dtype=np.float64)]

    def barrier(self) -> None:
        mx.eval(self.all_sum(mx.array([1.0])))

    def share_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (a run id, a dataset version): one all-reduce of its bytes."""
        data = (text or "").encode("utf-8") if self.is_main else b""
        if len(data) > _TEXT_BYTES:
            raise ValueError(f"text of {len(data)} bytes is too long to share (max {_TEXT_BYTES})")
        arr = np.zeros(_TEXT_BYTES, dtype=np.int32)
        arr[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        got = np.array(self.all_sum(mx.array(arr)), dtype=np.int64)
        return bytes(int(b) for b in got if b).decode("utf-8")

    def where(self) -> str:
        return f"rank {self.rank} of {self.size} on {socket.gethostname()}"


def launched() -> bool:
    """True in a process started by ``mlx.launch`` (or mpirun) for more than one rank."""
    for var in ("MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return bool(os.environ.get("MLX_HOSTFILE")) and bool(os.environ.get("MLX_RANK"))


def init(backend: str = "auto") -> DataParallel | None:
    """Join the ranks this process was launched with; None when it runs alone."""
    if not launched():
        return None
    group = mx.distributed.init(strict=True, backend="any" if backend == "auto" else backend)
    if group.size() <= 1:
        return None
    return DataParallel(group=group, rank=group.rank(), size=group.size())


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank is gone."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("connection to a peer was lost", "[ring]", "[mpi]", "nccl", "peer")
    )
