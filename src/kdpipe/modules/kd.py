"""``KDModule``: distillation from a stored sparse teacher signal, mixed with CE on the labels.

It is an :class:`SFTModule` whose training loss is
``ce_weight * CE + (1 - ce_weight) * divergence(teacher || student)`` over the teacher's top-k bins plus the
tail bin (see :mod:`kdpipe.losses.kd`). Batches come from the same ``PostTrainDataModule`` with the teacher
store joined. Validation stays CE on the labels, so SFT and KD stages report comparable ``val/loss``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from kdpipe.losses import FusedKDResult, KDLossSettings, KDTerms, combine_terms, sparse_kd_terms
from kdpipe.modules.sft import OptimizerFactory, SchedulerFactory, SFTModule

LOSS_KEYS = ("divergence", "beta", "temperature", "ce_weight", "tail", "normalize")


class KDModule(SFTModule):
    """Train a student on CE plus a divergence to the teacher's stored top-k distribution.

    Args:
        model, optimizer, scheduler, weight_decay, loss_impl, chunk_size, loss_backend: as for :class:`SFTModule`.
        loss: the stage's ``loss`` config (``divergence``, ``beta``, ``temperature``, ``ce_weight``,
            ``tail``, ``normalize``).
    """

    def __init__(
        self,
        model,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        weight_decay: float = 0.0,
        loss: DictConfig | dict | None = None,
        loss_impl: str = "fused",
        chunk_size: int | None = None,
        loss_backend: str = "auto",
    ) -> None:
        super().__init__(model, optimizer, scheduler, weight_decay, loss_impl, chunk_size, loss_backend)
        loss = dict(loss or {})
        unknown = set(loss) - set(LOSS_KEYS)
        if unknown:
            raise ValueError(f"unknown KD loss option(s) {sorted(unknown)}; options: {list(LOSS_KEYS)}")
        self.loss_options = loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        settings = KDLossSettings(**self.loss_options)
        # this rank's share of the global batch's loss (scale 1 and the configured mix on one process)
        scale, ce_weight = self.rank_weights(batch, settings.ce_weight, settings.normalize)
        if self.loss_impl == "fused":
            result = self.fused_terms(batch, settings.replace(ce_weight=ce_weight))
            loss = result.loss * scale
            self.log_diagnostics(result, batch, self.global_value(loss))
            return loss
        logits = self(batch)
        terms = sparse_kd_terms(
            logits,
            batch["topk_ids"],
            batch["topk_logprobs"],
            batch["tail_logprob"],
            batch["labels"],
            settings,
            has_teacher=batch["has_teacher"],
        )
        loss = combine_terms(terms, settings.replace(ce_weight=ce_weight)) * scale
        self.log_diagnostics(terms, batch, self.global_value(loss))
        return loss

    @torch.no_grad()
    def log_diagnostics(self, terms, batch: dict, loss: torch.Tensor) -> None:
        """Loss parts, teacher coverage and agreement, and the divergence per difficulty level.

        ``terms`` is a :class:`KDTerms` ([B, T] tensors) or a :class:`FusedKDResult` (1-D over label positions).
        ``loss`` is the global batch's; under DDP the other diagnostics describe this rank's part of it (rank 0's
        are logged): synchronising them would cost collectives every step, and per-level keys differ by rank.
        """
        n = len(batch["ids"])
        if isinstance(terms, FusedKDResult):  # lay the 1-D diagnostics back onto the batch layout
            terms = _unflatten(terms, batch["labels"])
        kd_mask, mask = terms.kd_mask, terms.mask
        kd_count = kd_mask.sum().clamp(min=1)
        topk_mass = terms.topk_mass.sum() / kd_count
        self.log_dict(
            {
                "train/ce": terms.ce.sum() / mask.sum().clamp(min=1),
                "train/divergence": terms.divergence.sum() / kd_count,
                "kd/teacher_topk_mass": topk_mass,
                "kd/teacher_tail_mass": 1.0 - topk_mass,
                "kd/top1_agreement": terms.top1_agree.sum() / kd_count,
                "kd/teacher_coverage": kd_mask.sum() / mask.sum().clamp(min=1),
            },
            batch_size=n,
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if "position_ids" in batch:  # packed rows mix levels; per-level needs row = example
            return
        levels = batch["levels"].to(kd_mask.device)
        for level in levels.unique().tolist():
            rows = levels == level
            count = kd_mask[rows].sum()
            if count > 0:
                self.log(f"kd/divergence_L{level}", terms.divergence[rows].sum() / count, batch_size=int(rows.sum()))


def _unflatten(result: FusedKDResult, labels: torch.Tensor) -> KDTerms:
    """Scatter the fused loss's per-label-position diagnostics back to the [B, T] layout of ``labels``."""

    def place(values: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((labels.numel(),), fill, dtype=values.dtype, device=values.device)
        out[result.positions] = values
        return out.view(labels.shape)

    mask = labels != -100
    return KDTerms(
        divergence=place(result.divergence, 0.0),
        ce=place(result.ce, 0.0),
        mask=mask,
        kd_mask=place(result.kd_mask, False),
        topk_mass=place(result.topk_mass, 0.0),
        top1_agree=place(result.top1_agree, False),
    )
