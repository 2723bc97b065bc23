"""``SFTModule``: supervised fine-tuning on assistant tokens (prompt tokens carry no labels)."""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
import torch
from torch.optim import Optimizer
from transformers import PreTrainedModel

from kdpipe.losses import fused_sparse_kd_terms, token_cross_entropy
from kdpipe.losses.backends import BACKENDS
from kdpipe.losses.settings import PLAIN_CE, KDLossSettings
from kdpipe.models.heads import backbone_hidden, lm_head
from kdpipe.types import IGNORE_INDEX

OptimizerFactory = Callable[..., Optimizer]
FROZEN_OMITTED = "kdpipe_frozen_weights_omitted"  # checkpoint key: the frozen weights left out of it
COUNTERS = "kdpipe_counters"  # checkpoint key: the work done up to it (see SFTModule.counters)
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


# prefixes FSDP and activation checkpointing put into parameter names of the modules they wrap
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model calls it."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def matrix_names(model: torch.nn.Module) -> set[str]:
    """Names of the model's weight matrices (ndim >= 2): the parameters weight decay applies to."""
    return {clean_name(n) for n, p in model.named_parameters() if p.ndim >= 2}


def param_groups(model: torch.nn.Module, weight_decay: float, matrices: set[str] | None = None) -> list[dict]:
    """Decay matrices; leave biases, norms and other vectors undecayed.

    ``matrices`` names the matrices when the parameters no longer show their shape: FSDP (``use_orig_params``)
    hands the optimizer flat 1-D shards, so the module records the names before it is wrapped."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_matrix = clean_name(name) in matrices if matrices is not None else p.ndim >= 2
            (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def local_denominators(labels: torch.Tensor, has_teacher: torch.Tensor | None, normalize: str) -> torch.Tensor:
    """What this batch's loss divides its CE and its divergence by: label (and teacher) positions for
    ``token`` normalisation, rows holding any for ``sequence``; float64 [2]."""
    mask = labels != IGNORE_INDEX
    teacher = mask & has_teacher.bool() if has_teacher is not None else mask
    if normalize == "token":
        counts = [mask.sum(), teacher.sum()]
    else:
        counts = [mask.reshape(labels.shape[0], -1).any(-1).sum(), teacher.reshape(labels.shape[0], -1).any(-1).sum()]
    return torch.stack(counts).to(torch.float64)


def rank_share(local: torch.Tensor, total: torch.Tensor, ce_weight: float, world_size: int) -> tuple[float, float]:
    """``(scale, ce_weight')`` such that ``scale * loss(ce_weight')`` on this rank's part of a global batch,
    averaged over the ranks (DDP averages gradients), is the loss of the whole global batch.

    The loss is ``w * S_ce / n_ce + (1 - w) * S_div / n_div`` with local sums S and local denominators n
    (``local``); the global batch's is the same over the ranks' summed S and N (``total``). With
    ``A = W w n_ce / N_ce`` and ``B = W (1 - w) n_div / N_div``: ``scale = A + B``, ``w' = A / (A + B)``.
    A rank without label positions gets scale 0 (it still runs forward and backward, as DDP requires)."""
    n_ce, n_div = (float(v) for v in local)
    total_ce, total_div = (float(v) for v in total)
    a = world_size * ce_weight * n_ce / total_ce if total_ce > 0 else 0.0
    b = world_size * (1.0 - ce_weight) * n_div / total_div if total_div > 0 else 0.0
    if a + b == 0.0:
        return 0.0, ce_weight
    return a + b, a / (a + b)


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
        loss_backend: how the fused loss computes each chunk's CE: ``auto`` (default: torch_npu's fused
            cross-entropy on an Ascend NPU, the generic path elsewhere), ``generic`` or ``npu``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        weight_decay: float = 0.0,
        loss_impl: str = "fused",
        chunk_size: int | None = None,
        loss_backend: str = "auto",
    ) -> None:
        super().__init__()
        if loss_impl not in ("fused", "plain"):
            raise ValueError(f"loss_impl must be 'fused' or 'plain', got {loss_impl!r}")
        if loss_backend not in BACKENDS:
            raise ValueError(f"loss_backend must be one of {BACKENDS}, got {loss_backend!r}")
        self.model = model
        self.loss_impl, self.chunk_size, self.loss_backend = loss_impl, chunk_size, loss_backend
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay = weight_decay
        self._step_started, self._batch_tokens, self._in_batch = 0.0, 0, False
        self._tokens_seen, self._batches_seen, self._train_seconds = 0, 0, 0.0
        self.seconds_before = 0.0  # the stage's wall-clock seconds before the checkpoint it resumed from
        self.attempt_started: float | None = None  # when this attempt's fit began (fit_stage sets it; or fit)
        self._val_sums: list[torch.Tensor] = []
        self._matrices = matrix_names(model)  # before any wrapping flattens the parameters (FSDP)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B, T, V] for a collated batch."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return self.model(**inputs, use_cache=False).logits

    def fused_terms(self, batch: dict, settings: KDLossSettings = PLAIN_CE):
        """Backbone hidden states through the fused LM-head loss (teacher fields used when present)."""
        weight, bias = lm_head(self.model)
        teacher = [batch.get(k) for k in ("topk_ids", "topk_logprobs", "tail_logprob")]
        return fused_sparse_kd_terms(
            backbone_hidden(self.model, batch),
            weight,
            *teacher,
            batch["labels"],
            settings,
            lm_head_bias=bias,
            chunk_size=self.chunk_size,
            has_teacher=batch.get("has_teacher"),
            backend=self.loss_backend,
        )

    def loss(self, batch: dict, scale: float = 1.0) -> torch.Tensor:
        """Token cross-entropy on the labels (times ``scale``: a rank's share, see :meth:`rank_weights`)."""
        if self.loss_impl == "fused":
            return self.fused_terms(batch).loss * scale
        return token_cross_entropy(self(batch), batch["labels"]) * scale

    def num_ranks(self) -> int:
        """Processes training together (1 outside a Trainer or on one process)."""
        trainer = self._trainer
        return trainer.world_size if trainer is not None else 1

    def rank_weights(self, batch: dict, ce_weight: float = 1.0, normalize: str = "token") -> tuple[float, float]:
        """``(scale, ce_weight)`` for this rank's part of the global batch (see :func:`rank_share`): with them
        the gradient DDP averages over the ranks, and the logged loss, are exactly the whole global batch's,
        however the label tokens fall onto the ranks. ``(1, ce_weight)`` on one process."""
        world = self.num_ranks()
        if world == 1:
            return 1.0, ce_weight
        local = local_denominators(batch["labels"], batch.get("has_teacher"), normalize)
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        return rank_share(local, total, ce_weight, world)

    def global_value(self, loss: torch.Tensor) -> torch.Tensor:
        """The global batch's loss from this rank's scaled share (the mean of the shares over the ranks)."""
        world = self.num_ranks()
        if world == 1:
            return loss.detach()
        return self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="sum") / world

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._step_started = time.perf_counter()
        self._batch_tokens = (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        )
        self._in_batch = True

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scale, _ = self.rank_weights(batch)
        loss = self.loss(batch, scale)
        self.log("train/loss", self.global_value(loss), prog_bar=True, batch_size=len(batch["ids"]))
        return loss

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        tokens, self._in_batch = self._batch_tokens, False
        self._tokens_seen += tokens
        self._batches_seen += 1
        self._train_seconds += elapsed
        self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True)

    def throughput(self) -> dict:
        """Non-pad tokens and batches trained on in this process, and their rates over the time spent in
        training steps (forward, backward, optimizer; validation and checkpointing excluded); a resumed stage's
        include the work before its checkpoint (several ranks: every rank resumes rank 0's counts)."""
        seconds = self._train_seconds
        return {
            "tokens_trained": self._tokens_seen,
            "tokens_per_s": self._tokens_seen / seconds if seconds else 0.0,
            "batches_trained": self._batches_seen,
            "batches_per_s": self._batches_seen / seconds if seconds else 0.0,
        }

    def on_fit_start(self) -> None:
        if self.attempt_started is None:
            self.attempt_started = time.perf_counter()

    def stage_seconds(self) -> float:
        """The stage's wall-clock seconds of fitting so far: this attempt's (from :attr:`attempt_started`) plus
        those of the attempts before the checkpoint it resumed from."""
        started = self.attempt_started
        return self.seconds_before + (time.perf_counter() - started if started is not None else 0.0)

    def counters(self) -> dict:
        """The work done so far, as a checkpoint keeps it (plain numbers: a ``weights_only`` load reads them):
        tokens and batches trained on, seconds in training steps, and the stage's seconds of fitting. A batch
        in flight counts: ``ModelCheckpoint`` saves in its ``on_train_batch_end``, before the module's own
        hook counts it, and a stage resumed from that checkpoint does not train on it again."""
        in_flight = int(self._in_batch)
        return {
            "tokens_trained": int(self._tokens_seen + in_flight * self._batch_tokens),
            "batches_trained": int(self._batches_seen + in_flight),
            "train_step_seconds": float(self._train_seconds)
            + (time.perf_counter() - self._step_started if in_flight else 0.0),
            "train_seconds": float(self.stage_seconds()),
        }

    def load_counters(self, counters: dict) -> None:
        """Continue the counts of :meth:`counters` (a resumed stage counts the interrupted attempt's work)."""
        self._tokens_seen = int(counters["tokens_trained"])
        self._batches_seen = int(counters["batches_trained"])
        self._train_seconds = float(counters["train_step_seconds"])
        self.seconds_before = float(counters["train_seconds"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        count = (batch["labels"] != -100).sum()
        if self.loss_impl == "fused":
            total = self.fused_terms(batch).ce.sum().float()
        else:
            total = token_cross_entropy(self(batch), batch["labels"], reduction="sum")
        self._val_sums.append(torch.stack([total, count.to(total)]))

    def on_validation_epoch_end(self) -> None:
        # sums over every rank's part of the validation set (one process: the whole set), then one ratio
        if self._val_sums:
            sums = torch.stack(self._val_sums).sum(0)
            if self.num_ranks() > 1:  # every rank validates (see PostTrainDataModule.val_dataloader)
                sums = self.trainer.strategy.reduce(sums.double(), reduce_op="sum")
            total, count = sums
            # the same on every rank already: sync_dist's mean changes nothing (and silences Lightning's advice)
            self.log("val/loss", (total / count.clamp(min=1)).float(), prog_bar=True, sync_dist=True)
        self._val_sums.clear()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the work done so far (:meth:`counters`) and leave frozen weights (a LoRA model's base) out of
        Lightning checkpoints: a resumed stage loads them again from where it started, so only the adapters,
        optimizer and loop state need saving."""
        checkpoint[COUNTERS] = self.counters()
        named = self.model.named_parameters(remove_duplicate=False)
        frozen = [f"model.{clean_name(n)}" for n, p in named if not p.requires_grad]  # FSDP: names without wrappers
        if frozen:
            state = checkpoint["state_dict"]
            checkpoint[FROZEN_OMITTED] = [key for key in frozen if state.pop(key, None) is not None]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Continue the checkpoint's counts (none in one saved before they were kept), and put the frozen
        weights it omits back from the model as loaded (its stage's start)."""
        if COUNTERS in checkpoint:
            self.load_counters(checkpoint[COUNTERS])
        omitted = checkpoint.get(FROZEN_OMITTED)
        if omitted:
            current = self.state_dict()
            for key in omitted:
                checkpoint["state_dict"].setdefault(key, current[key])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as configured. Under FSDP clip by the norm over every rank's shards, through the root unit's
        ``clip_grad_norm_`` (a per-shard norm would clip each rank differently; Lightning's FSDP precision plugin
        has no reference to the root and refuses norm clipping)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and isinstance(root, FullyShardedDataParallel):
            root.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.model, self.weight_decay, self._matrices))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, num_training_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
