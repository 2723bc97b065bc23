"""Cross-entropy on pre-shifted labels (``labels[t]`` is the target of position ``t``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.types import IGNORE_INDEX


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy over label positions, computed in float32 (float64 logits stay float64).

    Args:
        logits: [..., V] scores.
        labels: [...] target ids, ``ignore_index`` where there is nothing to learn.
        reduction: ``mean`` (over label tokens), ``sum``, or ``none`` (per position, 0 where ignored).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat if flat.dtype == torch.float64 else flat.float()
    losses = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses.view(labels.shape)
    if reduction == "sum":
        return losses.sum()
    count = (labels != ignore_index).sum().clamp(min=1)
    return losses.sum() / count
