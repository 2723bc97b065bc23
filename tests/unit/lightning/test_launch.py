"""Starting a pipeline's ranks (kdpipe.lightning.launch): launches that cannot run a pipeline are refused before
any process starts, and a one-process config starts nothing. (Real launches: tests/integration/test_distributed.py.)"""

from __future__ import annotations

import os

import pytest

from kdpipe.errors import PipelineConfigError
from kdpipe.lightning import launch
from kdpipe.utils import dist as kdist
from tests.helpers import LAUNCH_VARS, compose_cfg


def test_launches_that_cannot_run_a_pipeline_are_refused_before_any_process_starts(tmp_path, monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch, "ENTRY_POINT", False)
    spawn = compose_cfg(["trainer=ddp_cpu", "trainer.strategy=ddp_spawn"], tmp_path)
    with pytest.raises(PipelineConfigError, match="strategy=ddp"):
        launch.start_ranks(spawn)
    with pytest.raises(PipelineConfigError, match="kdpipe-train"):  # no command line to re-run for the ranks
        launch.start_ranks(compose_cfg(["trainer=ddp_cpu"], tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineConfigError, match="WORLD_SIZE"):  # e.g. torchrun with trainer.devices=1
        launch.start_ranks(compose_cfg(["trainer=cpu"], tmp_path))
    monkeypatch.delenv("WORLD_SIZE")
    job = launch.start_ranks(compose_cfg(["trainer=cpu"], tmp_path))
    assert not job.owns_group and not kdist.is_initialized()
    assert all(var not in os.environ for var in LAUNCH_VARS)
