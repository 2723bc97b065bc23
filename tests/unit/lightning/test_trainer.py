"""Trainers from the trainer configs: every config composes, ddp_cpu builds without starting processes."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from kdpipe.lightning.trainer import instantiate_trainer
from kdpipe.models.fsdp import DecoderLayerPolicy
from kdpipe.utils import dist as kdist
from tests.helpers import compose_cfg


@pytest.mark.parametrize("name", ["ddp_cpu", "ddp", "fsdp", "deepspeed", "default", "gpu"])
def test_trainer_configs_compose_with_num_nodes(name, tmp_path):
    cfg = compose_cfg([f"trainer={name}"], tmp_path)
    assert cfg.trainer.num_nodes == 1
    target = str(cfg.trainer.get("strategy", {}).get("_target_", ""))
    if name == "fsdp":
        assert target.endswith("FSDPStrategy") and cfg.trainer.strategy.state_dict_type == "full"
        assert isinstance(instantiate(cfg.trainer.strategy.auto_wrap_policy), DecoderLayerPolicy)
        assert instantiate(cfg.trainer.strategy).kwargs["use_orig_params"] is True
    if name == "ddp":
        strategy = instantiate(cfg.trainer.strategy)
        assert strategy._process_group_backend == "nccl" and strategy._ddp_kwargs["find_unused_parameters"] is False
    if name == "deepspeed":
        assert target.endswith("DeepSpeedStrategy") and cfg.trainer.strategy.stage == 2


def test_ddp_cpu_builds_a_two_process_gloo_trainer_without_starting_anything(tmp_path):
    cfg = compose_cfg(["trainer=ddp_cpu"], tmp_path)
    trainer = instantiate_trainer(cfg.trainer, logger=False)
    strategy = trainer.strategy
    assert type(strategy).__name__ == "DDPStrategy" and strategy.num_processes == 2
    assert strategy._process_group_backend == "gloo" and trainer.precision == "32-true"
    assert not kdist.is_initialized()


def test_precision_auto_outside_a_training_stage_is_lightnings_default(tmp_path):
    """``trainer.precision: auto`` is resolved per training stage (kdpipe.lightning.precision); a Trainer built
    from the config elsewhere (starting the ranks, scoring with ``precision: null``) gets Lightning's default."""
    cfg = compose_cfg(["trainer=cpu"], tmp_path)
    assert cfg.trainer.precision == "auto"
    assert instantiate_trainer(cfg.trainer, logger=False).precision == "32-true"
    assert instantiate_trainer(cfg.trainer, logger=False, precision="bf16-mixed").precision == "bf16-mixed"
