"""Losses: token cross-entropy today; the distillation divergences join it here."""

from kdpipe.losses.ce import token_cross_entropy

__all__ = ["token_cross_entropy"]
