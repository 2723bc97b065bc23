"""Rank helpers (kdpipe.utils.dist) in one process: ranks from the launchers' environment variables, and the
one-process answers of the collectives. (In a two-process group: tests/integration/test_distributed.py.)"""

from __future__ import annotations

import torch

from kdpipe.utils import dist as kdist
from tests.helpers import LAUNCH_VARS


def test_rank_helpers_read_the_launchers_environment(monkeypatch):
    for var in (*LAUNCH_VARS, "SLURM_PROCID", "JSM_NAMESPACE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert kdist.global_rank() == 0 and kdist.is_rank_zero() and kdist.world_size() == 1
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child of Lightning's launcher
    assert kdist.global_rank() == 1 and not kdist.is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # the launching process of a second machine
    assert not kdist.is_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert kdist.global_rank() == 5
    monkeypatch.setenv("RANK", "3")
    assert kdist.global_rank() == 3
    # without a process group the collectives are the one-process answers
    kdist.barrier()
    assert kdist.broadcast_object({"a": 1}) == {"a": 1}
    assert kdist.run_on_rank_zero(lambda x: x + 1, 1) == 2
    assert kdist.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
