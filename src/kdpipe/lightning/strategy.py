"""What a configured or built Lightning strategy is: its name, whether it shards weights, whether kdpipe runs it."""

from __future__ import annotations

import importlib.util
import os

import torch
from omegaconf import DictConfig, ListConfig
from torch.distributed.fsdp import FullyShardedDataParallel

from kdpipe.errors import PipelineConfigError
from lightning.pytorch.strategies import FSDPStrategy


def strategy_name(trainer_cfg: DictConfig) -> str:
    """The configured strategy, lower-cased: a registry name (``ddp``) or a class path (``...FSDPStrategy``)."""
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, DictConfig):
        return str(strategy.get("_target_", "")).lower()
    return str(strategy or "auto").lower()


def check_strategy(trainer_cfg: DictConfig) -> None:
    """Refuse strategies kdpipe cannot run, before any stage: DeepSpeed without its extra, ZeRO stage 3."""
    name = strategy_name(trainer_cfg)
    if "deepspeed" in name:
        strategy = trainer_cfg.get("strategy")
        if "stage_3" in name or (isinstance(strategy, DictConfig) and strategy.get("stage") == 3):
            raise PipelineConfigError(
                "DeepSpeed ZeRO stage 3 partitions the weights, which kdpipe's exports and fused LM-head loss need "
                "whole: use stage 1 or 2 (trainer=deepspeed), or trainer=fsdp to shard the model"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise PipelineConfigError(
                "trainer=deepspeed needs DeepSpeed: pip install 'kdpipe[deepspeed]' (or pip install deepspeed)"
            )


def maybe_several_processes(trainer_cfg: DictConfig) -> bool:
    """False when the config surely means one process (cheap: no Trainer is built for the common case)."""
    if int(os.environ.get("WORLD_SIZE", 1) or 1) > 1 or int(trainer_cfg.get("num_nodes", 1) or 1) > 1:
        return True
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, ListConfig | list | tuple):
        return len(devices) > 1
    return str(devices).strip() not in ("1", "[1]")


def shards_weights(strategy) -> bool:
    """Whether a Lightning strategy keeps only a shard of the weights on each rank (FSDP, DeepSpeed ZeRO 3), so
    that the whole model exists only inside its forward or in a gathered state dict."""
    return isinstance(strategy, FSDPStrategy) or bool(getattr(strategy, "zero_stage_3", False))


def wrapped_in_place(model: torch.nn.Module) -> bool:
    """Whether a strategy replaced some of the model's modules by its own wrappers (FSDP units)."""
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
