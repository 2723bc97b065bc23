"""Rank helpers for code that runs on every process of a multi-process job (DDP, FSDP, DeepSpeed).

Every rank runs the whole pipeline (see :mod:`kdpipe.lightning.launch`); side effects that are not part of the
training itself (the run's state and results, exports, evaluations, caches) happen on global rank 0 only, and
the other ranks wait at a :func:`barrier` where they read what rank 0 wrote. Everything here is a no-op, or
the single-process answer, when no ``torch.distributed`` process group is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from rich.console import Console

T = TypeVar("T")
# environment variables that carry the global rank, in the order launchers set them (torchrun / Lightning's
# launcher: RANK; SLURM: SLURM_PROCID; LSF: JSM_NAMESPACE_RANK)
RANK_VARS = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group exists (the job has several ranks and they are connected)."""
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, 0))
    except ValueError:
        return 0


def global_rank() -> int:
    """This process's global rank: from the process group when there is one, else from the launcher's
    environment (``RANK``, ``SLURM_PROCID``, ...). Before the process group exists the answer is exact for
    torchrun and SLURM; for Lightning's own launcher (``LOCAL_RANK`` and ``NODE_RANK`` only) it is non-zero
    exactly when the process is not global rank 0, which is all :func:`is_rank_zero` needs."""
    if is_initialized():
        return dist.get_rank()
    rank = next((_env_int(v) for v in RANK_VARS if v in os.environ), 0)
    local, node = _env_int("LOCAL_RANK"), _env_int("NODE_RANK") or _env_int("GROUP_RANK")
    if rank == 0 and (local or node):  # a launcher child or another node's process: not rank 0
        rank = node * max(_env_int("LOCAL_WORLD_SIZE"), local + 1) + local
    return rank


def world_size() -> int:
    """Number of ranks in the job (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_rank_zero() -> bool:
    """Whether this process does the job's non-training writes (global rank 0)."""
    return global_rank() == 0


def barrier() -> None:
    """Wait until every rank gets here; a no-op without a process group."""
    if not is_initialized():
        return
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable object); ``obj`` itself without a process group."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankZeroError(RuntimeError):
    """Raised on the other ranks when rank 0 failed in :func:`run_on_rank_zero` (rank 0 raises the original)."""


def run_on_rank_zero(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` on rank 0 only and give its result to every rank (the others wait meanwhile).

    For work whose side effects must happen once (an export, an evaluation that writes its generations, a
    rollout set): the result must be picklable. If ``fn`` raises on rank 0, the other ranks raise
    :class:`RankZeroError` instead of waiting for a result that never comes. The wait is a collective, so it
    is bounded by the process group's timeout (Lightning's default: 30 minutes; ``trainer.strategy.timeout``).
    """
    if not is_initialized():
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except BaseException as err:  # re-raised below, after telling the other ranks
            error = err
            outcome = ("error", f"{type(err).__name__}: {err}")
    status, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if status == "error":
        raise RankZeroError(f"rank 0 failed: {value}")
    return value


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks (a new tensor; ``tensor`` itself without a process group)."""
    if not is_initialized():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def rank_zero_console(**kwargs: Any) -> Console:
    """A rich console that prints on rank 0 only (the other ranks' copies of the same lines are noise).

    Decided when created (at import): launchers set the rank variables before Python starts."""
    return Console(quiet=not is_rank_zero(), **kwargs)
