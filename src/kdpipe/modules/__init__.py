"""LightningModules for the training stages and the teacher scorer."""

from kdpipe.modules.kd import KDModule
from kdpipe.modules.sft import SFTModule

__all__ = ["KDModule", "SFTModule"]
