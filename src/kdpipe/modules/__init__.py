"""LightningModules for the training stages."""

from kdpipe.modules.sft import SFTModule

__all__ = ["SFTModule"]
