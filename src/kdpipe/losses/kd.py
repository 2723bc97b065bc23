"""Distillation from a sparse teacher: its top-k log-probs plus one tail bin, on pre-shifted labels.

The teacher side stores, per position ``t`` (aligned with ``labels[t]``), the ids and log-probs of its top ``k``
tokens and ``tail_logprob = log(1 - sum(exp(topk_logprobs)))``. The student is scored on the same bins:

* ``tail="bucket"``: ``k + 1`` bins, the top-k ids plus everything else as one tail bin. With ``k = V`` the tail
  is empty on both sides and is left out, so the loss is then the full-vocabulary divergence.
* ``tail="renormalize"``: the top-k bins only, teacher and student each renormalised over them.
* ``tail="ignore"``: the top-k bins only, log-probs used as they are; the divergence is the sum of the usual
  summand over those bins, which is *not* a proper divergence (it need not be >= 0 nor vanish at P = Q).

Divergences, with P the teacher and Q the student over the bins (``0 * log 0 = 0`` throughout):

* ``fkl``: KL(P || Q); ``rkl``: KL(Q || P).
* ``jsd``: generalised JSD with ``M = beta * P + (1 - beta) * Q``: ``beta * KL(P || M) + (1 - beta) * KL(Q || M)``
  (the convention of TRL's GKD trainer); it is 0 at ``beta`` = 0 or 1.
* ``skew_fkl``: KL(P || beta * P + (1 - beta) * Q); ``skew_rkl``: KL(Q || beta * Q + (1 - beta) * P)
  (``beta`` is the skew, as in DistiLLM); ``beta = 0`` gives fkl / rkl, ``beta = 1`` gives 0.
* ``tvd``: 0.5 * sum |P - Q|.

Where the reverse KL (``rkl``, or ``skew_rkl`` at ``beta = 0``) meets a teacher bin of zero mass that the student
gives mass to, the true value is infinite; the teacher log-prob is floored at ``log`` of the smallest normal number
of the compute dtype (about -87 in float32, -708 in float64), which keeps value and gradient finite.

The temperature divides the student logits only: the teacher log-probs are taken as stored, already at the
teacher's temperature. The divergence is then multiplied by ``temperature ** 2`` (Hinton et al.'s correction,
which keeps gradient magnitudes comparable across temperatures) unless ``scale_by_t2=False``. The CE term always
uses the plain (temperature 1) student logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kdpipe.losses.settings import KDLossSettings, resolve


@dataclass
class KDTerms:
    """Per-position terms of the sparse distillation loss (all shaped like ``labels``).

    ``divergence`` is 0 outside ``kd_mask`` and includes the ``temperature ** 2`` factor when it applies; ``ce`` is
    0 outside ``mask``; ``topk_mass`` (teacher top-k mass) is 0 and ``top1_agree`` False outside ``kd_mask``.
    ``ce`` (``divergence``) carries no gradient when ``ce_weight`` is 0 (1): the loss does not use it then.
    ``settings`` are those the terms were computed with: :func:`combine_terms` reduces by them unless told others.
    """

    divergence: torch.Tensor
    ce: torch.Tensor
    mask: torch.Tensor
    kd_mask: torch.Tensor
    topk_mass: torch.Tensor
    top1_agree: torch.Tensor
    settings: KDLossSettings = field(default_factory=KDLossSettings)


def _check_shapes(student_logits, topk_ids, topk_logprobs, tail_logprob, labels, has_teacher) -> None:
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [B, T, V] or [N, V], got shape {tuple(student_logits.shape)}")
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a float tensor, got {student_logits.dtype}")
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match student_logits {(*lead, vocab)}")
    if topk_ids.dim() != len(lead) + 1 or tuple(topk_ids.shape[:-1]) != lead:
        raise ValueError(f"topk_ids shape {tuple(topk_ids.shape)} does not match student_logits {(*lead, vocab)}")
    if tuple(topk_logprobs.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_logprobs shape {tuple(topk_logprobs.shape)} does not match topk_ids {tuple(topk_ids.shape)}"
        )
    k = topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size {k} (topk_ids shape {tuple(topk_ids.shape)}) must be in [1, V={vocab}]")
    if tuple(tail_logprob.shape) != lead:
        raise ValueError(f"tail_logprob shape {tuple(tail_logprob.shape)} does not match positions {lead}")
    if has_teacher is not None and tuple(has_teacher.shape) != lead:
        raise ValueError(f"has_teacher shape {tuple(has_teacher.shape)} does not match positions {lead}")


def _kl_terms(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Elementwise ``a * (log a - log b)`` from log-probs, exactly 0 (value and gradient) where ``a = 0``."""
    live = la != -math.inf
    la0, lb0 = torch.where(live, la, 0.0), torch.where(live, lb, 0.0)
    return torch.where(live, la0.exp() * (la0 - lb0), 0.0)


def _mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` for ``0 < w < 1``."""
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _floor(lp: torch.Tensor) -> torch.Tensor:
    """Teacher log-probs floored at the log of the dtype's smallest normal number (see the module docstring)."""
    return lp.clamp_min(math.log(torch.finfo(lp.dtype).tiny))


def _zero(lq: torch.Tensor) -> torch.Tensor:
    """Zeros per position that stay attached to the student's graph (so ``backward`` works and gives 0)."""
    return torch.where(torch.isfinite(lq), lq, 0.0).sum(-1) * 0.0


def bin_divergence(lp: torch.Tensor, lq: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Divergence between teacher (``lp``) and student (``lq``) log-probs over the last dim, summed over bins."""
    # bins empty on both sides contribute exactly 0: (0, 0) there makes every summand 0 with finite gradients
    dead = (lp == -math.inf) & (lq == -math.inf)
    lp, lq = torch.where(dead, 0.0, lp), torch.where(dead, 0.0, lq)
    if divergence == "fkl":
        return _kl_terms(lp, lq).sum(-1)
    if divergence == "rkl":
        return _kl_terms(lq, _floor(lp)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if divergence == "jsd":
        if beta in (0.0, 1.0):
            return _zero(lq)
        lm = _mix(lp, lq, beta)
        return beta * _kl_terms(lp, lm).sum(-1) + (1.0 - beta) * _kl_terms(lq, lm).sum(-1)
    if beta == 1.0:
        return _zero(lq)
    if divergence == "skew_fkl":
        return _kl_terms(lp, lq if beta == 0.0 else _mix(lp, lq, beta)).sum(-1)
    # skew_rkl
    return _kl_terms(lq, _floor(lp) if beta == 0.0 else _mix(lq, lp, beta)).sum(-1)


def bin_logprobs(t_topk, t_tail, s_topk, lse, s_tail, tail: str, full_vocab: bool) -> tuple:
    """Teacher and student log-probs over the bins the divergence compares: the top-k renormalised
    (``renormalize``), the top-k alone (``ignore``, or ``k = V``), or the top-k and the tail bin (``bucket``).
    ``s_topk`` are the student's scaled logits at the teacher's ids, ``lse`` their log-normaliser [.., 1],
    ``s_tail`` the student's tail log-prob [.., 1] (bucket only)."""
    if tail == "renormalize":
        return t_topk.log_softmax(-1), s_topk.log_softmax(-1)
    if tail == "ignore" or full_vocab:
        return t_topk, s_topk - lse
    return torch.cat([t_topk, t_tail.unsqueeze(-1)], -1), torch.cat([s_topk - lse, s_tail], -1)


def _reduce(values: torch.Tensor, mask: torch.Tensor, normalize: str) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` per token, or per sequence then over sequences with a masked position."""
    values = torch.where(mask, values, 0.0)
    if normalize == "token":
        return values.sum() / mask.sum().clamp(min=1)
    per_row = values.sum(-1) / mask.sum(-1).clamp(min=1)
    return per_row.sum() / mask.any(-1).sum().clamp(min=1)


def sparse_kd_terms(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    labels: torch.Tensor,
    settings: KDLossSettings | None = None,
    *,
    has_teacher: torch.Tensor | None = None,
    **overrides: Any,
) -> KDTerms:
    """Per-position divergence, CE and diagnostics of the sparse KD loss; :func:`sparse_kd_loss` reduces them.

    Computed in float32 (float64 when ``student_logits`` is float64); see the module docstring for the bins,
    the divergences and the temperature.

    Args:
        student_logits: [B, T, V] or [N, V] scores.
        topk_ids: [..., k] teacher top-k token ids (distinct per position).
        topk_logprobs: [..., k] teacher log-probs of those ids, at the teacher's temperature.
        tail_logprob: [...] log of the teacher's remaining mass (``-inf`` when ``k = V``).
        labels: [...] pre-shifted targets, ``settings.ignore_index`` where there is nothing to learn.
        settings: the loss (:class:`KDLossSettings`; default ``KDLossSettings()``). With ``normalize="sequence"``
            the input must be [B, T, V]. "Positions" are label positions for CE and label positions with teacher
            data for the divergence.
        has_teacher: optional bool [...]; label positions where it is False get CE only: they leave the
            divergence mean (over label positions with teacher data) but stay in the CE mean.
        **overrides: fields of :class:`KDLossSettings` to change for this call (``ce_weight=0.5``).
    """
    s = resolve(settings, overrides)
    _check_shapes(student_logits, topk_ids, topk_logprobs, tail_logprob, labels, has_teacher)
    if s.normalize == "sequence" and student_logits.dim() != 3:
        raise ValueError(
            f"normalize='sequence' needs [B, T, V] student_logits, got shape {tuple(student_logits.shape)}"
        )

    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    logits = student_logits.to(dtype)
    vocab, k = logits.shape[-1], topk_ids.shape[-1]
    mask = labels != s.ignore_index
    kd_mask = mask if has_teacher is None else mask & has_teacher.bool()

    # positions without teacher data may hold anything: make them finite and in range, they are masked out below
    sel = kd_mask.unsqueeze(-1)
    ids = torch.where(sel, topk_ids.long(), 0)
    t_topk = torch.where(sel, topk_logprobs.to(dtype), 0.0)
    t_tail = torch.where(kd_mask, tail_logprob.to(dtype), 0.0)

    grad = torch.is_grad_enabled()
    with torch.set_grad_enabled(grad and s.ce_weight < 1.0):  # a term the loss weights by 0 keeps no graph
        z = logits / s.temperature if s.temperature != 1.0 else logits
        lse = z.logsumexp(-1, keepdim=True)
        s_topk = z.gather(-1, ids)  # student scaled logits at the teacher's ids
        s_tail = None
        if s.tail == "bucket" and k < vocab:  # the student's tail mass from its non-top-k logits, stable and exact
            rest = z.scatter(-1, ids, -math.inf)
            empty = rest.amax(-1, keepdim=True) == -math.inf  # e.g. the rest is -inf (masked) vocabulary entries
            rest_lse = rest.masked_fill_(empty, 0.0).logsumexp(-1, keepdim=True)  # finite gradients when empty
            s_tail = torch.where(empty, -math.inf, rest_lse) - lse
        lp, lq = bin_logprobs(t_topk, t_tail, s_topk, lse, s_tail, s.tail, k == vocab)
        div = bin_divergence(lp, lq, s.divergence, s.beta)
        if s.scale_by_t2:
            div = div * s.temperature**2
        div = torch.where(kd_mask, div, 0.0)

    with torch.set_grad_enabled(grad and s.ce_weight > 0.0):
        ce = F.cross_entropy(
            logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=s.ignore_index, reduction="none"
        ).view(labels.shape)

    with torch.no_grad():
        topk_mass = torch.where(kd_mask, t_topk.logsumexp(-1).exp(), 0.0)
        teacher_top1 = ids.gather(-1, t_topk.argmax(-1, keepdim=True)).squeeze(-1)
        top1_agree = (logits.argmax(-1) == teacher_top1) & kd_mask
    return KDTerms(div, ce, mask, kd_mask, topk_mass, top1_agree, s)


def sparse_kd_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``ce_weight * CE + (1 - ce_weight) * divergence`` against a sparse (top-k + tail) teacher, a scalar:
    :func:`combine_terms` of :func:`sparse_kd_terms`, whose arguments it takes."""
    return combine_terms(sparse_kd_terms(*args, **kwargs))


def combine_terms(terms: KDTerms, settings: KDLossSettings | None = None, **overrides: Any) -> torch.Tensor:
    """Reduce per-position terms to ``ce_weight * CE + (1 - ce_weight) * divergence`` (a scalar), by the
    ``ce_weight`` and ``normalize`` of ``settings`` (default: those the terms were computed with) and
    ``overrides``."""
    s = resolve(settings if settings is not None else terms.settings, overrides)
    if s.ce_weight == 1.0:
        return _reduce(terms.ce, terms.mask, s.normalize)
    div = _reduce(terms.divergence, terms.kd_mask, s.normalize)
    if s.ce_weight == 0.0:
        return div
    return s.ce_weight * _reduce(terms.ce, terms.mask, s.normalize) + (1.0 - s.ce_weight) * div
