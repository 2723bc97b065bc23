"""LoRA adapters (PEFT) for a model whose config enables them, and merging them back for the export.

A model config's ``lora`` block (``enabled``, ``r``, ``alpha``, ``dropout``, ``target_modules``) applies to
every training stage (sft, kd) of that model: the stage wraps the model it starts from in fresh adapters,
trains only those, and its export is the merged model (``merge_and_unload``), a plain ``transformers``
checkpoint. The next stage starts from that export with new adapters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

LORA_KEYS = ("enabled", "r", "alpha", "dropout", "target_modules")


def lora_enabled(cfg: Mapping | None) -> bool:
    return bool(cfg and cfg.get("enabled", False))


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper (without importing peft when it is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: torch.nn.Module, cfg: DictConfig | Mapping) -> torch.nn.Module:
    """Wrap ``model`` in LoRA adapters as ``cfg`` (a model config's ``lora`` block) describes; only the
    adapters are trainable."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    unknown = set(cfg) - set(LORA_KEYS)
    if unknown:
        raise ValueError(f"unknown lora option(s) {sorted(unknown)}; options: {list(LORA_KEYS)}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("lora.enabled=true needs peft: pip install 'kdpipe[real]'") from err
    targets = cfg.get("target_modules", "all-linear")
    config = LoraConfig(
        r=int(cfg.get("r", 16)),
        lora_alpha=int(cfg.get("alpha", 32)),
        lora_dropout=float(cfg.get("dropout", 0.05)),
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def maybe_apply_lora(model: torch.nn.Module, cfg: Mapping | None) -> torch.nn.Module:
    """``apply_lora`` when ``cfg.enabled``; the model unchanged otherwise."""
    return apply_lora(model, cfg) if lora_enabled(cfg) else model


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with the adapters merged into its weights (in place); any other model unchanged."""
    return model.merge_and_unload() if is_peft_model(model) else model
