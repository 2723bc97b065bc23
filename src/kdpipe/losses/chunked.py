"""The chunked LM-head loss: one chunking base and the per-chunk loss functions it runs.

:func:`chunked_loss` walks the label positions in chunks of ``chunk_size``: it makes each chunk's logits
``h @ W.T + b`` in float32 (float64 for float64 inputs), hands them to a chunk loss, and accumulates the gradients
with respect to the hidden states, the weight and the bias from the chunk's ``d loss / d logits`` by two matmuls
before the chunk's logits are freed. Peak memory grows with ``chunk_size x V``, not with ``N x V``; the three
matmuls, which dominate the cost, are done by hand, outside autograd.

A chunk loss takes ``(logits [n, V], positions)`` and returns :class:`ChunkTerms`: the chunk's weighted loss, its
gradient with respect to the logits and the per-position diagnostics. There are two:

* :func:`autograd_chunk`, for every setting: the terms of :func:`kdpipe.losses.kd.sparse_kd_terms` on the chunk
  (one definition of every divergence), only this elementwise part through autograd;
* :func:`closed_form_chunk`, for forward KL over the top-k + tail bins (or the full vocabulary): the gradient
  written out, no autograd graph; it can take its CE and log-softmax from a fused op (the ``npu`` backend).

The per-position weights (``Positions.w_ce``, ``Positions.w_div``) carry the normalisation and the ``ce_weight``
mix, so the sum of the chunks' losses is the whole loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from kdpipe.losses.kd import bin_divergence, bin_logprobs, sparse_kd_terms
from kdpipe.losses.settings import KDLossSettings
from kdpipe.losses.student import CEOp, _add_ce_, _exact_tail, _student

CHUNK_ELEMENTS = 1 << 24  # logits per chunk when chunk_size is not given: 64 MiB in float32
# ... but never fewer rows than this: the weight gradient's matmul reduces over the chunk's rows, and below a few
# hundred it runs well under the GEMM's speed (openPangu's LM head, V=153376, H=1536, on a 2-core CPU: the
# three matmuls over 1024 rows took 13.9 s in chunks of 128 rows, 10.9 s at 341 and 9.3 s at 512)
MIN_CHUNK_ROWS = 512


@dataclass
class Positions:
    """The label positions' inputs, 1-D over the positions in order (a chunk is a slice of them)."""

    ids: torch.Tensor  # [n, k] teacher top-k ids
    logprobs: torch.Tensor  # [n, k] their log-probs
    tail: torch.Tensor  # [n] the teacher's tail log-prob
    labels: torch.Tensor  # [n]
    has_teacher: torch.Tensor  # [n] bool
    w_ce: torch.Tensor  # [n] float64: the weight of each position's CE in the loss
    w_div: torch.Tensor  # [n] float64: the weight of each position's divergence

    def __getitem__(self, rows: slice) -> Positions:
        return Positions(*(getattr(self, f.name)[rows] for f in fields(self)))


@dataclass
class ChunkTerms:
    """What a chunk loss gives back: the chunk's weighted loss, ``d loss / d logits`` and detached diagnostics."""

    loss: torch.Tensor  # scalar, detached
    grad: torch.Tensor | None  # [n, V]; dropped once the chunk's parameter gradients are accumulated
    ce: torch.Tensor
    divergence: torch.Tensor
    kd_mask: torch.Tensor
    topk_mass: torch.Tensor
    top1_agree: torch.Tensor


ChunkLoss = Callable[..., ChunkTerms]  # (logits [n, V], Positions, work=[n, V] buffer or None) -> ChunkTerms


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk: one chunk's float32 logits take about 64 MiB, and at least ``MIN_CHUNK_ROWS``
    positions (a large vocabulary's chunk is then larger: 300 MiB at V=153376)."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size)


def closed_form_applies(settings: KDLossSettings, k: int, vocab: int) -> bool:
    """Forward KL over top-k + tail bucket (or the full vocabulary): the gradient has a closed form."""
    return settings.divergence == "fkl" and (settings.tail == "bucket" or k == vocab)


def chunk_loss_for(settings: KDLossSettings, k: int, vocab: int, ce_op: CEOp | None = None) -> ChunkLoss:
    """The chunk loss for these settings: forward KL's written-out gradient where it applies, else the bins'
    closed form (every divergence and tail mode). :func:`autograd_chunk` is the reference the tests compare
    them with."""
    if closed_form_applies(settings, k, vocab):
        return functools.partial(closed_form_chunk, settings=settings, ce_op=ce_op)
    return functools.partial(bins_chunk, settings=settings)


def _weighted(ce: torch.Tensor, div: torch.Tensor, part: Positions) -> torch.Tensor:
    return (ce * part.w_ce.to(ce.dtype)).sum() + (div * part.w_div.to(div.dtype)).sum()


def autograd_chunk(
    logits: torch.Tensor, part: Positions, settings: KDLossSettings, work: torch.Tensor | None = None
) -> ChunkTerms:
    """Any divergence and tail mode: :func:`sparse_kd_terms` on the chunk, its logit gradient by autograd
    (``work`` is not used: autograd makes its own buffers)."""
    with torch.enable_grad():
        z = logits.requires_grad_(True)
        terms = sparse_kd_terms(
            z, part.ids, part.logprobs, part.tail, part.labels, settings, has_teacher=part.has_teacher
        )
        loss = _weighted(terms.ce, terms.divergence, part)
        (grad,) = torch.autograd.grad(loss, z) if loss.requires_grad else (torch.zeros_like(z),)
    return ChunkTerms(
        loss.detach(),
        grad,
        terms.ce.detach(),
        terms.divergence.detach(),
        terms.kd_mask,
        terms.topk_mass,
        terms.top1_agree,
    )


def closed_form_chunk(
    logits: torch.Tensor,
    part: Positions,
    settings: KDLossSettings,
    ce_op: CEOp | None = None,
    work: torch.Tensor | None = None,
) -> ChunkTerms:
    """Per-position CE and forward KL of one chunk and the gradient of their weighted sum w.r.t. the logits,
    with no autograd graph. The gradient is written into ``work`` (a buffer shaped like ``logits``, reused
    across chunks; allocated when not given); ``logits`` may be overwritten.

    ``ce_op`` (the ``npu`` backend, with ``ce_weight > 0``) gives the CE and the log-softmax of the logits in one
    fused call; they replace the max, exp and sum of the generic path (at temperature 1 its softmax serves KL).

    With s = softmax(z), z = logits / T, bins K (teacher top-k) and the tail, P the teacher, q the student:
    d KL(P||q) / dz_j = M s_j - P_j for j in K, and s_j (M - P_tail / q_tail) outside K, where M is the total
    teacher mass over the bins (1 up to the stored values' rounding); the CE gradient
    is softmax(logits) - onehot(label). The divergence is scaled by T^2 (so its logit gradient by T).
    """
    temperature, ce_weight = settings.temperature, settings.ce_weight
    labels, kd_mask, t_lp, t_tail = part.labels, part.has_teacher, part.logprobs, part.tail
    scale = temperature if settings.scale_by_t2 else 1.0 / temperature
    rows = torch.arange(logits.shape[0], device=logits.device)
    vocab, k = logits.shape[-1], part.ids.shape[-1]
    ids = torch.where(kd_mask[:, None], part.ids, 0)
    p = torch.where(kd_mask[:, None], t_lp.to(logits.dtype).exp(), 0.0)
    has_tail = k < vocab
    p_tail = torch.where(kd_mask & has_tail, t_tail.to(logits.dtype).exp(), 0.0)
    teacher_top1 = ids.gather(-1, torch.where(kd_mask[:, None], t_lp, 0.0).argmax(-1, keepdim=True)).squeeze(-1)
    topk_mass = torch.where(kd_mask, p.sum(-1), 0.0)
    w_ce = part.w_ce.to(logits.dtype)
    ws = part.w_div.to(logits.dtype) * scale  # weight of the divergence gradient w.r.t. the logits
    t_kd = temperature if ce_weight < 1.0 else 1.0
    shared = t_kd == 1.0 and ce_weight > 0.0  # one softmax serves CE and KL
    st, op_ce = _student(logits, ids, labels, teacher_top1, kd_mask, t_kd, work, ce_op if shared else None)
    ce = torch.zeros_like(st.lse)
    if shared:
        ce = op_ce if op_ce is not None else st.lse - st.z_label
    div = torch.zeros_like(ce)
    e, grad = st.e, None
    if ce_weight < 1.0:
        log_q, s_k = st.z_k - st.lse[:, None], st.s_k
        if has_tail:
            log_q_tail, q_tail = _exact_tail(logits, ids, st, temperature)
            tail_term = torch.where(p_tail > 0, p_tail * (t_tail.to(ce.dtype) - log_q_tail), 0.0)
            ratio = torch.where(p_tail > 0, p_tail / q_tail, 0.0)
        else:
            tail_term = ratio = torch.zeros_like(ce)
        div = torch.where(p > 0, p * (t_lp.to(ce.dtype) - log_q), 0.0).sum(-1) + tail_term
        div = torch.where(kd_mask, div, 0.0)
        if settings.scale_by_t2:
            div = div * temperature**2
        # the stored bins need not sum to exactly 1 (float rounding): carry the teacher's total mass
        mass = torch.where(kd_mask, p.sum(-1) + p_tail, 0.0)
        if shared:
            e.mul_(((w_ce + ws * (mass - ratio)) * st.inv_total)[:, None])
            e.scatter_(-1, ids, s_k * (w_ce + ws * mass)[:, None] - ws[:, None] * p)
            e.index_put_((rows, labels), -w_ce, accumulate=True)
            return ChunkTerms(_weighted(ce, div, part), e, ce, div, kd_mask, topk_mass, st.top1_agree)
        e.mul_((ws * (mass - ratio) * st.inv_total)[:, None])
        e.scatter_(-1, ids, ws[:, None] * (s_k * mass[:, None] - p))
        grad = e
    if ce_weight > 0.0:
        if shared:  # CE alone: the softmax is the one made above
            e.mul_((w_ce * st.inv_total)[:, None])
            e.index_put_((rows, labels), -w_ce, accumulate=True)
            grad = e
        else:
            grad, ce = _add_ce_(logits, st, labels, w_ce, grad, ce_op)
    return ChunkTerms(_weighted(ce, div, part), grad, ce, div, kd_mask, topk_mass, st.top1_agree)


def bins_chunk(
    logits: torch.Tensor, part: Positions, settings: KDLossSettings, work: torch.Tensor | None = None
) -> ChunkTerms:
    """Any divergence and tail mode, with one elementwise pass over the logits for the gradient (written into
    ``work`` like :func:`closed_form_chunk`).

    Every divergence compares the teacher's bins with the student's bin log-probs ``lq``, which depend on the
    scaled logits ``z = logits / T`` only through the top-k logits ``z_K``, the log-normaliser ``lse`` and
    the tail log-prob ``lt = log(1 - sum_K softmax(z))`` (:func:`kdpipe.losses.kd.bin_logprobs`). So only
    the ``[n, k + 1]`` bins go through autograd, giving ``g_K = dL/dz_K``, ``g_lse`` and ``g_t = dL/dlt``, and

        dL/dz_j = s_j (g_lse - g_t) + s_j g_t / q_tail      (j outside the top-k)
        dL/dz_j = g_K,j + s_j (g_lse - g_t)                 (j in the top-k)

    with ``s = softmax(z)`` and ``q_tail = exp(lt)``: for a tail token, ``s_j / q_tail`` is its share of the
    tail bin. TVD's ``|p - q|`` takes the subgradient 0 at a tie (``p_b = q_b``), as ``torch.abs`` does.
    """
    temperature, ce_weight = settings.temperature, settings.ce_weight
    labels, kd_mask = part.labels, part.has_teacher
    rows = torch.arange(logits.shape[0], device=logits.device)
    vocab, k = logits.shape[-1], part.ids.shape[-1]
    full = k == vocab
    ids = torch.where(kd_mask[:, None], part.ids, 0)
    t_topk = torch.where(kd_mask[:, None], part.logprobs.to(logits.dtype), 0.0)
    t_tail = torch.where(kd_mask, part.tail.to(logits.dtype), 0.0)
    teacher_top1 = ids.gather(-1, t_topk.argmax(-1, keepdim=True)).squeeze(-1)
    topk_mass = torch.where(kd_mask, t_topk.logsumexp(-1).exp(), 0.0)
    w_ce = part.w_ce.to(logits.dtype)
    t_kd = temperature if ce_weight < 1.0 else 1.0
    shared = t_kd == 1.0 and ce_weight > 0.0  # one softmax serves CE and the divergence
    st, _ = _student(logits, ids, labels, teacher_top1, kd_mask, t_kd, work)
    ce = st.lse - st.z_label if shared else torch.zeros_like(t_tail)
    div, grad, e = torch.zeros_like(t_tail), None, st.e
    if ce_weight < 1.0:
        bucket = settings.tail == "bucket" and not full
        log_q_tail = q_tail = None
        if bucket:
            log_q_tail, q_tail = _exact_tail(logits, ids, st, temperature)
        with torch.enable_grad():
            z_k = st.z_k.clone().requires_grad_(True)
            lse_leaf = st.lse[:, None].clone().requires_grad_(True)
            tail_leaf = log_q_tail[:, None].clone().requires_grad_(True) if bucket else None
            lp, lq = bin_logprobs(t_topk, t_tail, z_k, lse_leaf, tail_leaf, settings.tail, full)
            per_position = bin_divergence(lp, lq, settings.divergence, settings.beta)
            if settings.scale_by_t2:
                per_position = per_position * temperature**2
            per_position = torch.where(kd_mask, per_position, 0.0)
            weighted = (per_position * part.w_div.to(per_position.dtype)).sum()
            leaves = [z_k, lse_leaf] + ([tail_leaf] if bucket else [])
            found = torch.autograd.grad(weighted, leaves, allow_unused=True) if weighted.requires_grad else ()
        g_k, g_lse, g_t = [*(g if g is not None else None for g in found), None, None, None][:3]
        g_k = torch.zeros_like(st.s_k) if g_k is None else g_k
        g_lse = torch.zeros_like(st.lse) if g_lse is None else g_lse[:, 0]
        g_t = torch.zeros_like(st.lse) if g_t is None else g_t[:, 0]
        div = per_position.detach()
        inside = g_lse - g_t  # every token's share through the normaliser
        outside = inside + (torch.where(q_tail > 0, g_t / q_tail, 0.0) if bucket else 0.0)
        if shared:
            e.mul_(((w_ce + outside) * st.inv_total)[:, None])
            e.scatter_(-1, ids, st.s_k * (w_ce + inside)[:, None] + g_k)
            e.index_put_((rows, labels), -w_ce, accumulate=True)
            return ChunkTerms(_weighted(ce, div, part), e, ce, div, kd_mask, topk_mass, st.top1_agree)
        inv_t = 1.0 / temperature  # d z / d logits
        e.mul_((outside * inv_t * st.inv_total)[:, None])
        e.scatter_(-1, ids, (st.s_k * inside[:, None] + g_k) * inv_t)
        grad = e
    if ce_weight > 0.0:
        if shared:  # CE alone
            e.mul_((w_ce * st.inv_total)[:, None])
            e.index_put_((rows, labels), -w_ce, accumulate=True)
            grad = e
        else:
            grad, ce = _add_ce_(logits, st, labels, w_ce, grad)
    return ChunkTerms(_weighted(ce, div, part), grad, ce, div, kd_mask, topk_mass, st.top1_agree)


def _accumulate(dz, h, w_mat, start, stop, grad_h, grad_w, grad_b, hidden) -> None:
    """Gradients of one chunk w.r.t. its hidden states, the weight and the bias, from d loss / d logits."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if grad_h is not None:
            grad_h[start:stop] = (dz @ w_mat).to(hidden.dtype)
        if grad_w is not None:
            grad_w.addmm_(dz.t(), h)
        if grad_b is not None:
            grad_b += dz.sum(0)


class _Chunked(torch.autograd.Function):
    """The loss as one autograd node: forward runs every chunk and keeps the parameter gradients for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, positions: Positions, chunk_loss: ChunkLoss, chunk: int, sink: list):
        compute = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=compute, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=compute, device=hidden.device)
        w_mat = weight.to(compute)
        b_vec = bias.to(compute) if bias is not None else None
        # two [chunk, V] buffers for the whole call: the logits and the gradient the chunk loss writes. Reused
        # chunk after chunk: a fresh 64 MiB tensor per chunk costs more in page faults than the exp over it
        rows = min(chunk, hidden.shape[0])
        logits_buf = torch.empty(rows, weight.shape[0], dtype=compute, device=hidden.device)
        work_buf = torch.empty_like(logits_buf)
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            h = hidden[start:stop].to(compute)
            logits = logits_buf[: stop - start]
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                torch.mm(h, w_mat.t(), out=logits)
                if b_vec is not None:
                    logits.add_(b_vec)
            terms = chunk_loss(logits, positions[start:stop], work=work_buf[: stop - start])
            del logits
            _accumulate(terms.grad, h, w_mat, start, stop, grad_h, grad_w, grad_b, hidden)
            total += terms.loss
            terms.grad = None  # the chunk's [n, V] buffer goes before the next chunk's logits are made
            sink.append(terms)
        ctx.grads = (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        return (*(g * grad_out.to(g.dtype) if g is not None else None for g in ctx.grads), None, None, None, None)


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: Positions,
    chunk_loss: ChunkLoss,
    chunk_size: int,
) -> tuple[torch.Tensor, list[ChunkTerms]]:
    """The loss over ``positions`` (``hidden`` [n, H] holds their hidden states) with gradients to ``hidden``,
    ``weight`` and ``bias``, and each chunk's :class:`ChunkTerms` (``grad`` dropped), in order."""
    sink: list[ChunkTerms] = []
    loss = _Chunked.apply(hidden, weight, bias, positions, chunk_loss, chunk_size, sink)
    return loss, sink
