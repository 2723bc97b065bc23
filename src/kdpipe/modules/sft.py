"""``SFTModule``: supervised fine-tuning on assistant tokens (prompt tokens carry no labels)."""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
import torch
from torch.optim import Optimizer
from transformers import PreTrainedModel

from kdpipe.losses import fused_sparse_kd_terms, token_cross_entropy
from kdpipe.models.heads import backbone_hidden, lm_head

OptimizerFactory = Callable[..., Optimizer]
FROZEN_OMITTED = "kdpipe_frozen_weights_omitted"  # checkpoint key: the frozen weights left out of it
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases, norms and other vectors undecayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SFTModule(L.LightningModule):
    """Train a causal LM on the assistant tokens of chat examples.

    Args:
        model: a ``transformers`` causal LM.
        optimizer: a partial optimizer (``_partial_: true`` config) called with the parameter groups.
        scheduler: a partial schedule called with ``(optimizer, num_training_steps=...)``, stepped per step.
        weight_decay: applied to matrices only.
        loss_impl: ``fused`` (default: hidden states and the LM head go to the chunked fused loss, the full
            [tokens x vocab] logits never exist) or ``plain`` (the model's logits, then the loss).
        chunk_size: label positions per chunk of the fused loss (None: about 64 MiB of logits per chunk).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        weight_decay: float = 0.0,
        loss_impl: str = "fused",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if loss_impl not in ("fused", "plain"):
            raise ValueError(f"loss_impl must be 'fused' or 'plain', got {loss_impl!r}")
        self.model = model
        self.loss_impl, self.chunk_size = loss_impl, chunk_size
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay = weight_decay
        self._step_started = 0.0
        self._tokens_seen, self._batches_seen, self._train_seconds = 0, 0, 0.0
        self._val_sums: list[torch.Tensor] = []

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B, T, V] for a collated batch."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return self.model(**inputs, use_cache=False).logits

    def fused_terms(self, batch: dict, **options):
        """Backbone hidden states through the fused LM-head loss (teacher fields used when present)."""
        weight, bias = lm_head(self.model)
        teacher = [batch.get(k) for k in ("topk_ids", "topk_logprobs", "tail_logprob")]
        return fused_sparse_kd_terms(
            backbone_hidden(self.model, batch),
            weight,
            *teacher,
            batch["labels"],
            lm_head_bias=bias,
            chunk_size=self.chunk_size,
            has_teacher=batch.get("has_teacher"),
            **options,
        )

    def loss(self, batch: dict) -> torch.Tensor:
        """Token cross-entropy on the labels."""
        if self.loss_impl == "fused":
            return self.fused_terms(batch, ce_weight=1.0).loss
        return token_cross_entropy(self(batch), batch["labels"])

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["ids"]))
        return loss

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self._tokens_seen += tokens
        self._batches_seen += 1
        self._train_seconds += elapsed
        self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True)

    def throughput(self) -> dict:
        """Non-pad tokens and batches trained on in this process, and their rates over the time spent in
        training steps (forward, backward, optimizer; validation and checkpointing excluded)."""
        seconds = self._train_seconds
        return {
            "tokens_trained": self._tokens_seen,
            "tokens_per_s": self._tokens_seen / seconds if seconds else 0.0,
            "batches_trained": self._batches_seen,
            "batches_per_s": self._batches_seen / seconds if seconds else 0.0,
        }

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        count = (batch["labels"] != -100).sum()
        if self.loss_impl == "fused":
            total = self.fused_terms(batch, ce_weight=1.0).ce.sum().float()
        else:
            total = token_cross_entropy(self(batch), batch["labels"], reduction="sum")
        self._val_sums.append(torch.stack([total, count.to(total)]))

    def on_validation_epoch_end(self) -> None:
        if self._val_sums:
            total, count = torch.stack(self._val_sums).sum(0)
            self.log("val/loss", total / count.clamp(min=1), prog_bar=True, sync_dist=True)
        self._val_sums.clear()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave frozen weights (a LoRA model's base) out of Lightning checkpoints: a resumed stage loads them
        again from where it started, so only the adapters, optimizer and loop state need saving."""
        frozen = [f"model.{n}" for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad]
        if frozen:
            state = checkpoint["state_dict"]
            checkpoint[FROZEN_OMITTED] = [key for key in frozen if state.pop(key, None) is not None]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Put the frozen weights a checkpoint omits back from the model as loaded (its stage's start)."""
        omitted = checkpoint.get(FROZEN_OMITTED)
        if omitted:
            current = self.state_dict()
            for key in omitted:
                checkpoint["state_dict"].setdefault(key, current[key])

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.model, self.weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, num_training_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
