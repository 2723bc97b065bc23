"""FSDP wrapping for ``transformers`` models: one FSDP unit per decoder layer, the rest in the root unit.

Why the LM head must stay in the root unit: kdpipe's fused loss (and the teacher scorer) read the LM-head weight
directly, outside the head's own ``forward``. Lightning runs ``training_step`` / ``validation_step`` /
``predict_step`` *inside* the root FSDP unit's forward (its forward redirection), where the root's parameters
(embeddings, final norm, LM head; tied or not) are gathered whole; a decoder layer's parameters are gathered in
that layer's forward. Wrapping only the decoder layers therefore gives the fused loss the whole weight, and
its gradient (computed inside the forward, returned in backward) flows into the root's flat parameter, whose
gradient FSDP reduce-scatters as usual. Wrapping the head on its own would shard its weight there; kdpipe's
:func:`~kdpipe.models.heads.lm_head` refuses that with a clear error. Tied embeddings must share a unit anyway.
"""

from __future__ import annotations

import torch


class DecoderLayerPolicy:
    """An FSDP auto-wrap (or activation-checkpointing) policy: wrap every module whose class is a decoder layer.

    Args:
        layer_classes: class names to wrap, e.g. ``[LlamaDecoderLayer]``; None (default): the model's own
            ``_no_split_modules`` (the blocks ``transformers`` never splits across devices: its decoder layers),
            read from the module tree the first time the policy is asked.

    It is the callable form FSDP accepts (``(module, recurse, nonwrapped_numel) -> bool``): recurse everywhere,
    wrap the named classes.
    """

    def __init__(self, layer_classes: list[str] | None = None) -> None:
        self.names: set[str] | None = {str(c) for c in layer_classes} if layer_classes else None

    @staticmethod
    def model_layer_classes(root: torch.nn.Module) -> set[str]:
        """The ``_no_split_modules`` of every ``transformers`` model inside ``root``."""
        names: set[str] = set()
        for module in root.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
        return names

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if self.names is None:  # the first call is the root: every model is inside it
            self.names = self.model_layer_classes(module)
            if not self.names:
                raise ValueError(
                    f"{type(module).__name__} names no decoder layer classes (_no_split_modules): set the policy's "
                    "layer_classes, e.g. trainer.strategy.auto_wrap_policy.layer_classes=[LlamaDecoderLayer]"
                )
        if recurse:
            return True
        return type(module).__name__ in self.names
