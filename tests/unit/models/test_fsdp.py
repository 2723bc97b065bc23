"""FSDP pieces of the models layer: the wrap policy (one unit per decoder layer, also for activation
checkpointing) and the refusal of an LM head FSDP has sharded."""

from __future__ import annotations

import pytest
import torch

from kdpipe.models.fsdp import DecoderLayerPolicy
from kdpipe.models.heads import lm_head
from tests.helpers import tiny_llama


def _tiny_llama(tied: bool = True):
    return tiny_llama(vocab_size=20, hidden_size=8, intermediate_size=16, tie_word_embeddings=tied, seed=None).train()


def test_wrap_policy_wraps_the_decoder_layers_and_nothing_else():
    model = _tiny_llama()
    policy = DecoderLayerPolicy()
    assert policy(model, recurse=True)  # the root: recurse, and learn the layer classes
    wrapped = {name for name, module in model.named_modules() if module is not model and policy(module, False)}
    assert wrapped == {"model.layers.0", "model.layers.1"}
    assert DecoderLayerPolicy(["LlamaMLP"])(model.model.layers[0].mlp, False)
    # the same policy as trainer.strategy.activation_checkpointing_policy: torch wraps each layer for recomputation
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    apply_activation_checkpointing(model, auto_wrap_policy=DecoderLayerPolicy())
    assert [type(layer) for layer in model.model.layers] == [CheckpointWrapper] * 2
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == 2  # and nothing else
    with pytest.raises(ValueError, match="layer_classes"):
        DecoderLayerPolicy()(torch.nn.Linear(2, 2), True)


def test_a_sharded_lm_head_weight_is_refused_with_the_fix():
    model = _tiny_llama(tied=False)
    weight, _ = lm_head(model)
    assert weight.shape == (20, 8)
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(80))  # what FSDP leaves outside the forward
    with pytest.raises(ValueError, match=r"sharded parameter .*decoder layers"):
        lm_head(model)
