"""Split a causal LM into its backbone (hidden states) and its LM head, so losses and the teacher scorer
can work on chosen positions in chunks instead of materialising [tokens x vocab] logits for a whole batch.

A PEFT (LoRA) wrapper is looked through: its backbone, with the adapters injected, gives the hidden states.
Tied embeddings and an LM-head bias are returned as they are, so gradients reach the shared weight and the bias.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kdpipe.models.lora import is_peft_model


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The ``transformers`` model inside a PEFT wrapper (adapters still injected), else ``model`` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def backbone_hidden(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the final norm) for a collated batch."""
    model = base_model(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None or backbone is model:
        raise ValueError(f"{type(model).__name__} has no separate backbone (base_model_prefix)")
    return backbone(**inputs, use_cache=False).last_hidden_state


# config keys of architectures whose logits are not just ``hidden @ W.T + b`` (value: the neutral setting)
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def logit_transform(model: PreTrainedModel) -> str:
    """Which logit transform (softcapping, scaling) the model's config applies after its LM head; '' if none."""
    config = getattr(model, "config", None)
    found = []
    for key, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, key, neutral)
        if value is not None and value != neutral:
            found.append(f"{key}={value}")
    return ", ".join(found)


def lm_head(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's weight [V, H] and bias [V] (or None); tied embeddings included."""
    model = base_model(model)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings")
    transform = logit_transform(model)
    if transform:
        raise ValueError(
            f"{type(model).__name__} transforms its logits ({transform}), which kdpipe's chunked LM head "
            "(loss_impl=fused, score stages) does not apply: train it with loss_impl=plain; scoring it is unsupported"
        )
    if hasattr(head, "lora_A"):  # the fused loss reads the plain weight: an adapter on the head would be ignored
        raise ValueError(
            "LoRA on the LM head is not supported with loss_impl=fused: leave lm_head out of lora.target_modules "
            "(all-linear does) or set loss_impl=plain"
        )
    if head.weight.dim() != 2:
        raise ValueError(
            f"the LM head's weight has shape {tuple(head.weight.shape)} where kdpipe reads it: a sharded parameter "
            "(FSDP, DeepSpeed ZeRO 3) seen outside the forward that gathers it. Under FSDP keep the LM head and the "
            "embeddings in the root unit (wrap only the decoder layers: configs/trainer/fsdp.yaml), so the training "
            "step, which runs inside the root's forward, sees the whole weight; or set loss_impl=plain"
        )
    return head.weight, getattr(head, "bias", None)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits in float32 for hidden states [..., H], also under bf16/fp16 autocast (which would round them)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = hidden.float() @ weight.float().t()
        return logits + bias.float() if bias is not None else logits
