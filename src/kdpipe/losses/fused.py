"""The sparse KD loss fused with the LM head: never holds the [tokens x vocab] logits.

``fused_sparse_kd_loss(hidden, lm_head_weight, ...)`` equals ``sparse_kd_loss(hidden @ W.T + b, ...)`` in value
and gradients, but:

* only label positions are computed (prompt and padding positions carry no loss, so they cost nothing);
* those positions are walked in chunks of ``chunk_size``; each chunk's logits are made in float32 (float64 for
  float64 inputs), its loss and the gradient of that loss with respect to its logits are computed, and the
  gradients with respect to the hidden states, the weight and the bias are accumulated by two matmuls before
  the chunk's logits are freed. Peak memory grows with ``chunk_size x V``, not with ``N x V``;
* the per-position loss terms come from :func:`kdpipe.losses.kd.sparse_kd_terms` on each chunk (one definition
  of every divergence), and only the chunk's elementwise part goes through autograd; the three matmuls, which
  dominate the cost, are done by hand.

Per-position weights carry the normalisation (``token`` or ``sequence``) and the ``ce_weight`` mix, computed from
the masks before chunking, so the sum over chunks equals the reference's reduction exactly.

Backends (``backend=``): ``generic`` is the path above, on any device. ``npu`` computes the CE part of each chunk
with ``torch_npu.npu_cross_entropy_loss`` (CE and log-softmax in one fused call; the CE gradient is then
softmax - onehot from that log-softmax, and at temperature 1 the same softmax serves the forward KL), instead of a
logsumexp and a separate exp. It applies where the chunk's gradient has the closed form (forward KL with the tail
bucket or the full vocabulary, or plain CE as in SFT) with ``ce_weight > 0``; other settings use the generic
chunk. ``auto`` (the default) picks ``npu`` when the hidden states are on an NPU and ``torch_npu`` has the op, and
``generic`` otherwise. The choice is logged once per process at INFO ("fused KD loss: ..."). The ``npu`` path is
tested against the generic path and a float64 reference with a CPU stand-in for the op (tests/npu_standin.py), not
on Ascend hardware.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdpipe.data.encode import IGNORE_INDEX
from kdpipe.losses.kd import NORMALIZE_MODES, sparse_kd_terms

log = logging.getLogger(__name__)

BACKENDS = ("auto", "generic", "npu")
NPU_CE_MAX_ROWS = 200_000  # torch_npu.npu_cross_entropy_loss takes at most this many rows per call
CEOp = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (logits, labels) -> (ce, log_sm)
_ANNOUNCED: set[tuple[str, str]] = set()  # (backend, reason) pairs already logged by this process


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
    backend: str = "generic"  # the path that computed it: generic | npu (see the module docstring)


def _closed_form_applies(options: dict, k: int, vocab: int) -> bool:
    """Forward KL over top-k + tail bucket (or the full vocabulary), with CE: the gradient has a closed form."""
    return options["divergence"] == "fkl" and (options["tail"] == "bucket" or k == vocab)


def _closed_form_chunk(logits, ids, t_lp, t_tail, labels, kd_mask, w_ce, w_div, options, ce_op: CEOp | None = None):
    """Per-position CE and forward KL of one chunk, the gradient of their weighted sum w.r.t. the logits
    (written into ``logits`` in place), and the diagnostics; no autograd graph is built.

    ``ce_op`` (the ``npu`` backend, with ``ce_weight > 0``) gives the CE and the log-softmax of the logits in one
    fused call; they replace the logsumexp and the exp of the generic path (which runs unchanged without it).

    With s = softmax(z), z = logits / T, bins K (teacher top-k) and the tail, P the teacher, q the student:
    d KL(P||q) / dz_j = M s_j - P_j for j in K, and s_j (M - P_tail / q_tail) outside K, where M is the total
    teacher mass over the bins (1 up to the stored values' rounding); the CE gradient
    is softmax(logits) - onehot(label). The divergence is scaled by T^2 (so its logit gradient by T).
    """
    temperature, ce_weight = options["temperature"], options["ce_weight"]
    scale = temperature if options["scale_by_t2"] else 1.0 / temperature
    rows = torch.arange(logits.shape[0], device=logits.device)
    vocab, k = logits.shape[-1], ids.shape[-1]
    ids = torch.where(kd_mask[:, None], ids, 0)
    p = torch.where(kd_mask[:, None], t_lp.to(logits.dtype).exp(), 0.0)
    has_tail = k < vocab
    p_tail = torch.where(kd_mask & has_tail, t_tail.to(logits.dtype).exp(), 0.0)
    with torch.no_grad():
        teacher_top1 = ids.gather(-1, torch.where(kd_mask[:, None], t_lp, 0.0).argmax(-1, keepdim=True)).squeeze(-1)
        top1_agree = (logits.argmax(-1) == teacher_top1) & kd_mask
        topk_mass = torch.where(kd_mask, p.sum(-1), 0.0)

    w_ce = w_ce.to(logits.dtype)
    ws = w_div.to(logits.dtype) * scale  # weight of the divergence gradient w.r.t. the logits
    ce = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    div = torch.zeros_like(ce)
    log_sm = None  # log-softmax of the logits (temperature 1), when the fused CE op made it
    if ce_op is not None and ce_weight > 0.0:
        ce, log_sm = ce_op(logits, labels)
        lse1 = ce + logits[rows, labels]  # CE = lse - z_label
    else:
        lse1 = logits.logsumexp(-1) if ce_weight > 0.0 else None
        if ce_weight > 0.0:
            ce = lse1 - logits[rows, labels]
    if ce_weight < 1.0:
        z = logits / temperature if temperature != 1.0 else logits
        lse = lse1 if temperature == 1.0 and lse1 is not None else z.logsumexp(-1)
        if log_sm is not None and temperature == 1.0:  # the op's log-softmax is log softmax(z)
            log_q = log_sm.gather(-1, ids)
            s, log_sm = log_sm.exp_(), None  # softmax(z): becomes the gradient buffer
        else:
            log_q = z.gather(-1, ids) - lse[:, None]
            s = (z - lse[:, None]).exp_()  # softmax(z): becomes the gradient buffer
        s_k = s.gather(-1, ids)
        if has_tail:
            q_tail = (1.0 - s_k.sum(-1)).clamp(min=0.0)
            # 1 - sum loses precision when the student's tail is tiny: recompute those rows exactly
            exact = q_tail < 1e-3
            log_q_tail = q_tail.clamp(min=torch.finfo(q_tail.dtype).tiny).log()
            if exact.any():
                zr = z[exact].scatter(-1, ids[exact], float("-inf"))
                log_q_tail[exact] = zr.logsumexp(-1) - lse[exact]
            tail_term = torch.where(p_tail > 0, p_tail * (t_tail.to(z.dtype) - log_q_tail), 0.0)
            ratio = torch.where(p_tail > 0, p_tail / log_q_tail.exp(), 0.0)
        else:
            tail_term = ratio = torch.zeros_like(lse)
        div = torch.where(p > 0, p * (t_lp.to(z.dtype) - log_q), 0.0).sum(-1) + tail_term
        div = torch.where(kd_mask, div, 0.0)
        if options["scale_by_t2"]:
            div = div * temperature**2
        # the stored bins need not sum to exactly 1 (float rounding): carry the teacher's total mass
        mass = torch.where(kd_mask, p.sum(-1) + p_tail, 0.0)
        if temperature == 1.0 and ce_weight > 0.0:  # one softmax serves CE and KL
            s *= (w_ce + ws * (mass - ratio))[:, None]
            s.scatter_(-1, ids, s_k * (w_ce + ws * mass)[:, None] - ws[:, None] * p)
            s.index_put_((rows, labels), -w_ce, accumulate=True)
            return ce, div, s, kd_mask, topk_mass, top1_agree
        s *= (ws * (mass - ratio))[:, None]
        s.scatter_(-1, ids, ws[:, None] * (s_k * mass[:, None] - p))
        grad = s
    else:
        grad = None
    if ce_weight > 0.0:
        soft = log_sm.exp_() if log_sm is not None else (logits - lse1[:, None]).exp_()
        soft.index_put_((rows, labels), torch.full_like(lse1, -1.0), accumulate=True)
        soft *= w_ce[:, None]
        grad = soft if grad is None else grad.add_(soft)
    return ce, div, grad, kd_mask, topk_mass, top1_agree


def _on_npu(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives on an Ascend NPU (asks :mod:`kdpipe.accelerators`, whose device mapping the tests'
    CPU stand-in redirects; False without ``torch_npu`` imported)."""
    if sys.modules.get("torch_npu") is None:
        return False
    from kdpipe.accelerators.npu import is_npu_device

    return is_npu_device(tensor.device)


def _npu_cross_entropy() -> Callable | None:
    """``torch_npu.npu_cross_entropy_loss`` when ``torch_npu`` is imported and has it, else None (never imports)."""
    module = sys.modules.get("torch_npu")
    return getattr(module, "npu_cross_entropy_loss", None) if module is not None else None


def _npu_ce_op(fused_ce: Callable) -> CEOp:
    """(logits [N, V] float32, labels [N]) -> (CE [N], log-softmax [N, V]) from one fused torch_npu call."""

    def ce_and_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, log_prob, _, _ = fused_ce(logits, labels, reduction="none")
        return loss, log_prob

    return ce_and_log_softmax


def choose_backend(
    backend: str, hidden: torch.Tensor, options: dict, k: int, vocab: int, compute: torch.dtype
) -> tuple[str, str]:
    """The backend that computes this call (``generic`` or ``npu``) and why; see the module docstring.

    ``npu`` asked for explicitly fails (ValueError) without torch_npu's fused op or with the hidden states off the
    NPU; where the op does not apply (another divergence, ``ce_weight=0``, float64) it falls back to ``generic``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "generic":
        return "generic", "backend=generic"
    on_npu, fused_ce = _on_npu(hidden), _npu_cross_entropy()
    if backend == "npu":
        if fused_ce is None:
            raise ValueError(
                "backend='npu' needs torch_npu (imported) with npu_cross_entropy_loss: install the kdpipe[ascend] "
                "extra and run on an NPU (README: Running on Ascend), or use backend='auto' / 'generic'"
            )
        if not on_npu:
            raise ValueError(f"backend='npu' needs the hidden states on an NPU, got them on {hidden.device}")
    elif not on_npu:
        return "generic", f"hidden states on {hidden.device.type}"
    elif fused_ce is None:
        return "generic", "this torch_npu has no npu_cross_entropy_loss"
    if not _closed_form_applies(options, k, vocab):
        return "generic", f"divergence={options['divergence']}, tail={options['tail']}: autograd chunks, no fused CE"
    if options["ce_weight"] <= 0.0:
        return "generic", "ce_weight=0: no CE term for the fused op"
    if compute != torch.float32:
        return "generic", f"{compute} compute: the fused op takes float32/float16/bfloat16"
    return "npu", "hidden states on an NPU"


def _announce(backend: str, reason: str) -> None:
    """Log the backend choice at INFO, once per process for each (backend, reason)."""
    if (backend, reason) in _ANNOUNCED:
        return
    _ANNOUNCED.add((backend, reason))
    what = "npu fused cross-entropy (torch_npu.npu_cross_entropy_loss)" if backend == "npu" else "generic chunked"
    log.info("fused KD loss: %s (%s)", what, reason)


CHUNK_ELEMENTS = 1 << 24  # logits per chunk when chunk_size is not given: 64 MiB in float32


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one chunk's float32 logits take about 64 MiB."""
    return max(16, CHUNK_ELEMENTS // vocab_size)


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


def _accumulate(dz, h, w_mat, start, stop, grad_h, grad_w, grad_b, hidden) -> None:
    """Gradients of one chunk w.r.t. its hidden states, the weight and the bias, from d loss / d logits."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if grad_h is not None:
            grad_h[start:stop] = (dz @ w_mat).to(hidden.dtype)
        if grad_w is not None:
            grad_w.addmm_(dz.t(), h)
        if grad_b is not None:
            grad_b += dz.sum(0)


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, ids, logprobs, tail, labels, has_teacher, w_ce, w_div, options, chunk, sink, ce_op
    ):
        compute = torch.float64 if hidden.dtype == torch.float64 or weight.dtype == torch.float64 else torch.float32
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=compute, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=compute, device=hidden.device)
        w_mat = weight.to(compute)
        closed_form = _closed_form_applies(options, ids.shape[-1], weight.shape[0])
        b_vec = bias.to(compute) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            h = hidden[start:stop].to(compute)
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                logits = h @ w_mat.t()
                if b_vec is not None:
                    logits = logits + b_vec
            if closed_form:
                ce, div, dz, kdm, mass, agree = _closed_form_chunk(
                    logits,
                    ids[start:stop],
                    logprobs[start:stop],
                    tail[start:stop],
                    labels[start:stop],
                    has_teacher[start:stop],
                    w_ce[start:stop],
                    w_div[start:stop],
                    options,
                    ce_op,
                )
                del logits
                chunk_loss = (ce * w_ce[start:stop].to(compute)).sum() + (div * w_div[start:stop].to(compute)).sum()
                _accumulate(dz, h, w_mat, start, stop, grad_h, grad_w, grad_b, hidden)
                total += chunk_loss
                sink.append((ce, div, kdm, mass, agree))
                del dz
                continue
            with torch.enable_grad():
                z = logits.requires_grad_(True)
                terms = sparse_kd_terms(
                    z,
                    ids[start:stop],
                    logprobs[start:stop],
                    tail[start:stop],
                    labels[start:stop],
                    has_teacher=has_teacher[start:stop],
                    **options,
                )
                chunk_loss = (terms.ce * w_ce[start:stop].to(compute)).sum() + (
                    terms.divergence * w_div[start:stop].to(compute)
                ).sum()
                (dz,) = torch.autograd.grad(chunk_loss, z) if chunk_loss.requires_grad else (torch.zeros_like(z),)
            _accumulate(dz, h, w_mat, start, stop, grad_h, grad_w, grad_b, hidden)
            total += chunk_loss.detach()
            sink.append(
                (terms.ce.detach(), terms.divergence.detach(), terms.kd_mask, terms.topk_mass, terms.top1_agree)
            )
            del logits, z, dz, terms
        ctx.grads = (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.grads
        scale = grad_out
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * scale.to(grad_w.dtype) if grad_w is not None else None,
            grad_b * scale.to(grad_b.dtype) if grad_b is not None else None,
            *([None] * 11),
        )


def fused_sparse_kd_terms(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_logprob: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    tail: str = "bucket",
    ignore_index: int = IGNORE_INDEX,
    normalize: str = "token",
    has_teacher: torch.Tensor | None = None,
    scale_by_t2: bool = True,
    backend: str = "auto",
) -> FusedKDResult:
    """The fused loss and its per-position diagnostics; see :func:`fused_sparse_kd_loss`."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if normalize == "sequence" and hidden.dim() != 3:
        raise ValueError(f"normalize='sequence' needs [B, T, H] hidden states, got {tuple(hidden.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up")
    if lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(lm_head_weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    no_teacher = topk_ids is None
    if no_teacher:
        if ce_weight != 1.0:
            raise ValueError("without teacher tensors only plain cross-entropy (ce_weight=1) is defined")
        topk_ids = torch.zeros((*labels.shape, 1), dtype=torch.long, device=labels.device)
        topk_logprobs = torch.zeros((*labels.shape, 1), device=labels.device)
        tail_logprob = torch.full(labels.shape, float("-inf"), device=labels.device)
        has_teacher = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)

    n_rows = labels.shape[0] if labels.dim() == 2 else 1
    flat_labels = labels.reshape(-1)
    rows = torch.arange(n_rows, device=labels.device).repeat_interleave(flat_labels.numel() // n_rows)
    mask = flat_labels != ignore_index
    teacher = mask if has_teacher is None else mask & has_teacher.reshape(-1).bool()
    w_ce = _position_weights(mask, rows, normalize, n_rows) * ce_weight
    w_div = _position_weights(teacher, rows, normalize, n_rows) * (1.0 - ce_weight)

    positions = mask.nonzero().squeeze(-1)
    k = topk_ids.shape[-1]
    sink: list = []
    options = {
        "divergence": divergence,
        "beta": beta,
        "temperature": temperature,
        "ce_weight": ce_weight,
        "tail": tail,
        "ignore_index": ignore_index,
        "normalize": "token",  # terms only; the weights above carry the normalisation
        "scale_by_t2": scale_by_t2,
    }
    compute = torch.float64 if torch.float64 in (hidden.dtype, lm_head_weight.dtype) else torch.float32
    chosen, reason = choose_backend(backend, hidden, options, k, lm_head_weight.shape[0], compute)
    _announce(chosen, reason)
    ce_op = _npu_ce_op(_npu_cross_entropy()) if chosen == "npu" else None
    if ce_op is not None:
        chunk_size = min(chunk_size, NPU_CE_MAX_ROWS)
    if not torch.is_grad_enabled():  # evaluation: no gradient work at all inside the chunks
        hidden, lm_head_weight = hidden.detach(), lm_head_weight.detach()
        lm_head_bias = lm_head_bias.detach() if lm_head_bias is not None else None
    loss = _FusedKD.apply(
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions),
        lm_head_weight,
        lm_head_bias,
        topk_ids.reshape(-1, k)[positions],
        topk_logprobs.reshape(-1, k)[positions],
        tail_logprob.reshape(-1)[positions],
        flat_labels[positions],
        teacher[positions],
        w_ce[positions],
        w_div[positions],
        options,
        chunk_size,
        sink,
        ce_op,
    )
    if sink:
        diagnostics = [torch.cat([part[i] for part in sink]) for i in range(5)]
    else:  # no label position at all
        empty = torch.zeros(0, device=labels.device)
        diagnostics = [empty, empty, empty.bool(), empty, empty.bool()]
    names = ("ce", "divergence", "kd_mask", "topk_mass", "top1_agree")
    return FusedKDResult(loss=loss, positions=positions, backend=chosen, **dict(zip(names, diagnostics)))


def fused_sparse_kd_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_logprob: torch.Tensor | None,
    labels: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """``sparse_kd_loss`` of ``hidden @ lm_head_weight.T (+ lm_head_bias)`` without materialising the logits.

    Args:
        hidden: final hidden states [B, T, H] or [N, H] (any float dtype; the logits are made in float32).
        lm_head_weight: [V, H] (tied embeddings are fine: gradients go to the tensor passed).
        topk_ids, topk_logprobs, tail_logprob: the teacher's sparse signal, aligned with ``labels``; all three
            may be ``None`` for plain fused cross-entropy (``ce_weight=1``).
        labels: pre-shifted targets, ``ignore_index`` where there is nothing to learn.
        lm_head_bias: optional [V].
        chunk_size: label positions per chunk (peak memory ~ chunk_size x V floats, times a few); default:
            :func:`auto_chunk_size` (about 64 MiB of float32 logits per chunk).
        backend: ``auto`` (default), ``generic`` or ``npu``: how each chunk's CE is computed (module docstring).
        **kwargs: the options of :func:`kdpipe.losses.kd.sparse_kd_loss` (divergence, beta, temperature,
            ce_weight, tail, ignore_index, normalize, has_teacher, scale_by_t2).
    """
    return fused_sparse_kd_terms(hidden, lm_head_weight, topk_ids, topk_logprobs, tail_logprob, labels, **kwargs).loss
