"""Strategies kdpipe refuses before any stage: DeepSpeed without its extra, ZeRO stage 3."""

from __future__ import annotations

import importlib.util

import pytest

from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.strategy import check_strategy
from tests.helpers import compose_cfg


def test_deepspeed_needs_its_extra_and_stage_3_is_refused(tmp_path):
    cfg = compose_cfg(["trainer=deepspeed"], tmp_path)
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(PipelineConfigError, match=r"kdpipe\[deepspeed\]"):
            check_strategy(cfg.trainer)
    cfg.trainer.strategy.stage = 3
    with pytest.raises(PipelineConfigError, match="stage 3"):
        check_strategy(cfg.trainer)
