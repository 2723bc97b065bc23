"""Stage orders and stage settings that cannot run are refused before any stage, naming the key (and the
closest valid name); a typo in a config key fails at composition."""

from __future__ import annotations

import pytest

from kdpipe.cli.train import train
from kdpipe.errors import PipelineConfigError


def test_unknown_stage_name_in_order_is_refused_before_training(tiny_cfg, tmp_path):
    with pytest.raises(PipelineConfigError, match=r"unknown stage 'sft_fats'.*did you mean 'sft_fast'"):
        train(tiny_cfg("pipeline.order=[teacher_sft,sft_fats]"))
    assert not (tmp_path / "run").exists()


def test_unknown_stage_kind_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match=r"kind='sfd' is not a stage kind.*did you mean 'sft'"):
        train(tiny_cfg("pipeline.stages.sft_fast.kind=sfd"))


def test_typo_in_a_stage_key_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match=r"pipeline\.stages\.sft_fast\.max_step \(did you mean 'max_steps'"):
        train(tiny_cfg("+pipeline.stages.sft_fast.max_step=3"))
    with pytest.raises(PipelineConfigError, match=r"pipeline\.stages\.sft_fast\.eval\.splt"):
        train(tiny_cfg("+pipeline.stages.sft_fast.eval.splt=val"))


def test_stage_naming_an_unknown_model_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match=r"model='techer' is not a configured model"):
        train(tiny_cfg("pipeline.stages.sft_fast.model=techer"))


def test_missing_resume_directory_is_refused(tiny_cfg, tmp_path):
    with pytest.raises(PipelineConfigError, match=r"resume directory .*does not exist"):
        train(tiny_cfg(f"resume={tmp_path / 'nope'}"))


def test_config_key_typo_fails_at_composition(tiny_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_step"):
        tiny_cfg("trainer.max_step=3")
