"""The student's side of one fused-loss chunk, computed in place: softmax by max, exp and sum into a reused
work buffer, the tail bin (recomputed exactly where ``1 - sum`` loses precision), and the CE at temperature 1
when the divergence's softmax was at another. Both closed forms of :mod:`kdpipe.losses.chunked` use them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CEOp = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (logits, labels) -> (ce, log_sm)


@dataclass
class _Student:
    """What the closed forms read from a chunk's logits, with ``exp(z - max z)`` in the work buffer.

    ``z = logits / T``. ``e`` is the unnormalised softmax of ``z`` (``softmax(z) = e * inv_total``): it becomes
    the gradient, scaled once per row, so the chunk makes no ``[n, V]`` tensor of its own.
    """

    e: torch.Tensor  # [n, V] exp(z - max z), in the work buffer
    inv_total: torch.Tensor  # [n] 1 / sum(e)
    lse: torch.Tensor  # [n] logsumexp(z)
    z_k: torch.Tensor  # [n, k] z at the teacher's ids
    s_k: torch.Tensor  # [n, k] softmax(z) at the teacher's ids
    m: torch.Tensor  # [n] the largest raw logit
    z_label: torch.Tensor  # [n] the raw logit of the label
    top1_agree: torch.Tensor  # [n] bool: the teacher's top-1 is (one of) the student's largest logits


def _student(
    logits: torch.Tensor,
    ids: torch.Tensor,
    labels: torch.Tensor,
    teacher_top1: torch.Tensor,
    kd_mask: torch.Tensor,
    temperature: float,
    work: torch.Tensor | None,
    ce_op: CEOp | None = None,
) -> tuple[_Student, torch.Tensor | None]:
    """The student's side of a chunk; ``logits`` are left as they are. With ``ce_op`` (temperature 1), the op's
    CE and log-softmax replace the max, exp and sum; its CE comes back second (else None)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    with torch.no_grad():
        m = logits.amax(-1)
        top1_agree = (logits.gather(-1, teacher_top1[:, None]).squeeze(-1) >= m) & kd_mask
        z_label = logits[rows, labels]
        z_k = logits.gather(-1, ids)
        if ce_op is not None:  # the fused op (npu): CE and log-softmax in one call; temperature 1
            ce, log_sm = ce_op(logits, labels)
            e = log_sm.exp_()
            lse, inv_total = ce + z_label, torch.ones_like(m)
            return _Student(e, inv_total, lse, z_k, e.gather(-1, ids), m, z_label, top1_agree), ce
        if work is None or work.shape != logits.shape or work.dtype != logits.dtype:
            work = torch.empty_like(logits)
        e = torch.sub(logits, m[:, None], out=work)
        if temperature != 1.0:
            e.div_(temperature)
            z_k = z_k / temperature
        e.exp_()
        total = e.sum(-1)
        inv_total = 1.0 / total
        lse = m / temperature + total.log()
        s_k = e.gather(-1, ids) * inv_total[:, None]
    return _Student(e, inv_total, lse, z_k, s_k, m, z_label, top1_agree), None


def _exact_tail(
    logits: torch.Tensor, ids: torch.Tensor, st: _Student, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's tail bin ``log(1 - sum_K softmax(z))`` and its probability; ``1 - sum`` loses precision
    when the tail is tiny, so those rows are recomputed from the logits."""
    q_tail = (1.0 - st.s_k.sum(-1)).clamp(min=0.0)
    log_q_tail = q_tail.clamp(min=torch.finfo(q_tail.dtype).tiny).log()
    exact = q_tail < 1e-3
    if exact.any():
        z = logits[exact] / temperature if temperature != 1.0 else logits[exact]
        log_q_tail[exact] = z.scatter(-1, ids[exact], float("-inf")).logsumexp(-1) - st.lse[exact]
    return log_q_tail, log_q_tail.exp()


def _add_ce_(logits: torch.Tensor, st: _Student, labels: torch.Tensor, w_ce: torch.Tensor, grad, ce_op=None):
    """CE at temperature 1 when the divergence's softmax was at another: ``logits`` become ``w_ce`` times
    ``softmax(logits) - onehot(label)`` in place (``ce_op``: from the fused op's log-softmax) and are added to
    ``grad``; returns (grad, per-position CE)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    if ce_op is not None:
        ce, log_sm = ce_op(logits, labels)
        soft = log_sm.exp_().mul_(w_ce[:, None])
    else:
        soft = logits.sub_(st.m[:, None]).exp_()
        total = soft.sum(-1)
        ce = st.m + total.log() - st.z_label
        soft.mul_((w_ce / total)[:, None])
    soft.index_put_((rows, labels), -w_ce, accumulate=True)
    return (soft if grad is None else grad.add_(soft)), ce
