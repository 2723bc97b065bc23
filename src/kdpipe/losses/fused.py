"""The sparse KD loss fused with the LM head: never holds the [tokens x vocab] logits.

``fused_sparse_kd_loss(hidden, lm_head_weight, ..., settings)`` equals
``sparse_kd_loss(hidden @ W.T + b, ..., settings)`` in value and gradients, but only label positions are computed
(prompt and padding positions carry no loss, so they cost nothing), and those are walked in chunks through the
LM head (:mod:`kdpipe.losses.chunked`), so peak memory grows with ``chunk_size x V``, not with ``N x V``.

This module is the front of that loss: it checks the inputs, picks the label positions, turns the normalisation
(``token`` or ``sequence``) and the ``ce_weight`` mix into per-position weights computed from the masks before
chunking (so the sum over chunks equals the reference's reduction exactly), picks the backend
(:mod:`kdpipe.losses.backends`: ``generic`` or torch_npu's fused cross-entropy) and logs that choice once per
process at INFO ("fused KD loss: ..."), runs the chunks and lays out the diagnostics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from kdpipe.losses.backends import NPU_CE_MAX_ROWS, choose_backend, npu_ce_op, npu_cross_entropy
from kdpipe.losses.chunked import Positions, auto_chunk_size, chunk_loss_for, chunked_loss
from kdpipe.losses.settings import KDLossSettings, resolve

log = logging.getLogger(__name__)

_ANNOUNCED: set[tuple[str, str]] = set()  # (backend, reason) pairs already logged by this process
DIAGNOSTICS = ("ce", "divergence", "kd_mask", "topk_mass", "top1_agree")


@dataclass
class FusedKDResult:
    """The loss and detached per-label-position diagnostics (1-D, over the label positions in order)."""

    loss: torch.Tensor
    ce: torch.Tensor
    divergence: torch.Tensor
    kd_mask: torch.Tensor
    topk_mass: torch.Tensor
    top1_agree: torch.Tensor
    positions: torch.Tensor  # flat indices of the label positions in the [B*T] (or [N]) layout
    backend: str = "generic"  # the path that computed it: generic | npu (see kdpipe.losses.backends)


def _announce(backend: str, reason: str) -> None:
    """Log the backend choice at INFO, once per process for each (backend, reason)."""
    if (backend, reason) in _ANNOUNCED:
        return
    _ANNOUNCED.add((backend, reason))
    what = "npu fused cross-entropy (torch_npu.npu_cross_entropy_loss)" if backend == "npu" else "generic chunked"
    log.info("fused KD loss: %s (%s)", what, reason)


def _position_weights(mask: torch.Tensor, rows: torch.Tensor, normalize: str, n_rows: int) -> torch.Tensor:
    """Weights that turn a sum over positions into the reference's mean (per token, or per sequence)."""
    w = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    if normalize == "token":
        w[mask] = 1.0 / max(int(mask.sum()), 1)
        return w
    counts = torch.zeros(n_rows, dtype=torch.float64, device=mask.device).index_add_(0, rows, mask.double())
    n_seqs = max(int((counts > 0).sum()), 1)
    w[mask] = 1.0 / (counts[rows[mask]] * n_seqs)
    return w


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, settings: KDLossSettings) -> None:
    if settings.normalize == "sequence" and hidden.dim() != 3:
        raise ValueError(f"normalize='sequence' needs [B, T, H] hidden states, got {tuple(hidden.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")


def fused_sparse_kd_terms(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_logprob: torch.Tensor | None,
    labels: torch.Tensor,
    settings: KDLossSettings | None = None,
    *,
    lm_head_bias: torch.Tensor | None = None,
    has_teacher: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    **overrides: Any,
) -> FusedKDResult:
    """``sparse_kd_loss`` of ``hidden @ lm_head_weight.T (+ lm_head_bias)`` without materialising the logits,
    with its per-label-position diagnostics.

    Args:
        hidden: final hidden states [B, T, H] or [N, H] (any float dtype; the logits are made in float32).
        lm_head_weight: [V, H] (tied embeddings are fine: gradients go to the tensor passed).
        topk_ids, topk_logprobs, tail_logprob: the teacher's sparse signal, aligned with ``labels``; all three
            may be ``None`` for plain fused cross-entropy (``ce_weight=1``).
        labels: pre-shifted targets, ``settings.ignore_index`` where there is nothing to learn.
        settings: the loss (:class:`KDLossSettings`; default ``KDLossSettings()``), as for ``sparse_kd_loss``.
        lm_head_bias: optional [V].
        has_teacher: as for ``sparse_kd_loss``.
        chunk_size: label positions per chunk (peak memory ~ chunk_size x V floats, times a few); default:
            :func:`kdpipe.losses.chunked.auto_chunk_size` (about 64 MiB of float32 logits per chunk, at least
            512 positions).
        backend: ``auto`` (default), ``generic`` or ``npu``: how each chunk's CE is computed
            (:mod:`kdpipe.losses.backends`).
        **overrides: fields of :class:`KDLossSettings` to change for this call (``ce_weight=1.0``).
    """
    s = resolve(settings, overrides)
    _check(hidden, lm_head_weight, labels, s)
    if chunk_size is None:
        chunk_size = auto_chunk_size(lm_head_weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if topk_ids is None:
        if s.ce_weight != 1.0:
            raise ValueError("without teacher tensors only plain cross-entropy (ce_weight=1) is defined")
        topk_ids = torch.zeros((*labels.shape, 1), dtype=torch.long, device=labels.device)
        topk_logprobs = torch.zeros((*labels.shape, 1), device=labels.device)
        tail_logprob = torch.full(labels.shape, float("-inf"), device=labels.device)
        has_teacher = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)

    n_rows = labels.shape[0] if labels.dim() == 2 else 1
    flat_labels = labels.reshape(-1)
    rows = torch.arange(n_rows, device=labels.device).repeat_interleave(flat_labels.numel() // n_rows)
    mask = flat_labels != s.ignore_index
    teacher = mask if has_teacher is None else mask & has_teacher.reshape(-1).bool()
    positions = mask.nonzero().squeeze(-1)
    k, vocab = topk_ids.shape[-1], lm_head_weight.shape[0]
    inputs = Positions(
        ids=topk_ids.reshape(-1, k)[positions],
        logprobs=topk_logprobs.reshape(-1, k)[positions],
        tail=tail_logprob.reshape(-1)[positions],
        labels=flat_labels[positions],
        has_teacher=teacher[positions],
        w_ce=(_position_weights(mask, rows, s.normalize, n_rows) * s.ce_weight)[positions],
        w_div=(_position_weights(teacher, rows, s.normalize, n_rows) * (1.0 - s.ce_weight))[positions],
    )

    compute = torch.float64 if torch.float64 in (hidden.dtype, lm_head_weight.dtype) else torch.float32
    chosen, reason = choose_backend(backend, hidden, s, k, vocab, compute)
    _announce(chosen, reason)
    ce_op = npu_ce_op(npu_cross_entropy()) if chosen == "npu" else None
    if ce_op is not None:
        chunk_size = min(chunk_size, NPU_CE_MAX_ROWS)
    if not torch.is_grad_enabled():  # evaluation: no parameter gradients accumulated in the chunks
        hidden, lm_head_weight = hidden.detach(), lm_head_weight.detach()
        lm_head_bias = lm_head_bias.detach() if lm_head_bias is not None else None
    chunk_loss = chunk_loss_for(s.replace(normalize="token"), k, vocab, ce_op)  # the weights carry the mean
    loss, chunks = chunked_loss(
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions),
        lm_head_weight,
        lm_head_bias,
        inputs,
        chunk_loss,
        chunk_size,
    )
    if chunks:
        diagnostics = {name: torch.cat([getattr(c, name) for c in chunks]) for name in DIAGNOSTICS}
    else:  # no label position at all
        empty = torch.zeros(0, device=labels.device)
        diagnostics = dict(zip(DIAGNOSTICS, (empty, empty, empty.bool(), empty, empty.bool())))
    return FusedKDResult(loss=loss, positions=positions, backend=chosen, **diagnostics)


def fused_sparse_kd_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``fused_sparse_kd_terms(...).loss``: the fused loss alone; takes the same arguments."""
    return fused_sparse_kd_terms(*args, **kwargs).loss
