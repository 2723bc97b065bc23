"""``lightning.Trainer`` from a trainer config, and where inference runs for that config."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import lightning as L
from kdpipe.accelerators import NPUUnavailableError, npu_device, require_npu
from kdpipe.accelerators import register as register_accelerators
from kdpipe.errors import PipelineConfigError
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

MIXED_PRECISION = {"bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed", "16-mixed": "16-mixed", "16": "16-mixed"}


def check_trainer_device(trainer_cfg: DictConfig) -> None:
    """Fail early, before any stage runs, when the trainer asks for an NPU that cannot be used here (the message
    says what to install or to source) or asks for one without the settings Lightning does not infer."""
    if str(trainer_cfg.get("accelerator")) != "npu":
        return
    try:
        require_npu()
    except NPUUnavailableError as err:
        raise PipelineConfigError(f"trainer.accelerator=npu: {err}") from err
    if trainer_cfg.get("strategy") in (None, "auto"):
        raise PipelineConfigError(
            "trainer.accelerator=npu needs an explicit strategy (for a custom accelerator Lightning falls back to a "
            "CPU single-device strategy, or gloo DDP): use trainer=npu (one NPU) or trainer=npu_ddp (HCCL)"
        )


def instantiate_trainer(trainer_cfg: DictConfig, **overrides) -> L.Trainer:
    """``lightning.Trainer`` from a trainer config plus keyword overrides; registers kdpipe's accelerators.

    Nested ``_target_`` nodes (the strategy and precision plugin the NPU configs give) are instantiated too. A
    ``precision`` (from the config or the overrides, e.g. a score stage's ``32-true``) replaces a precision plugin
    the config gives; mixed precision keeps the plugin's autocast device (for the NPU, ``npu``: Lightning would
    pick CUDA autocast for a custom accelerator).
    """
    register_accelerators()
    check_trainer_device(trainer_cfg)
    factory = hydra.utils.instantiate(trainer_cfg, _partial_=True)
    settings = {**factory.keywords, **overrides}
    plugins = list(settings.get("plugins") or [])
    precision = settings.get("precision")
    if str(precision) == "auto":  # resolved per training stage (kdpipe.lightning.precision); elsewhere the default
        precision = None
    given = [p for p in plugins if isinstance(p, Precision)]
    autocast = next((p.device for p in given if isinstance(p, MixedPrecision)), None)
    if autocast is None and str(settings.get("accelerator")) == "npu":
        autocast = "npu"
    if precision is not None and (given or autocast is not None):
        plugins = [p for p in plugins if not isinstance(p, Precision)]
        if str(precision) in MIXED_PRECISION and autocast is not None:
            plugins.append(MixedPrecision(MIXED_PRECISION[str(precision)], device=autocast))
            precision = None
    return factory(**{**overrides, "plugins": plugins or None, "precision": precision})


def inference_device(trainer_cfg: DictConfig) -> torch.device:
    """Where generation (eval, rollouts) runs: the trainer's NPU, else CUDA when available and not ``cpu``."""
    if str(trainer_cfg.get("accelerator")) == "npu":
        index = OmegaConf.select(trainer_cfg, "strategy.device.index", default=None)
        return npu_device(None if index is None else int(index))
    return torch.device("cuda" if torch.cuda.is_available() and trainer_cfg.accelerator != "cpu" else "cpu")
