"""Split a causal LM into its backbone (hidden states) and its LM head, so losses and the teacher scorer
can work on chosen positions in chunks instead of materialising [tokens x vocab] logits for a whole batch."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def backbone_hidden(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the final norm) for a collated batch."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None or backbone is model:
        raise ValueError(f"{type(model).__name__} has no separate backbone (base_model_prefix)")
    return backbone(**inputs, use_cache=False).last_hidden_state


def lm_head(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's weight [V, H] and bias [V] (or None); tied embeddings included."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings")
    return head.weight, getattr(head, "bias", None)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits in float32 for hidden states [..., H], also under bf16/fp16 autocast (which would round them)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = hidden.float() @ weight.float().t()
        return logits + bias.float() if bias is not None else logits
