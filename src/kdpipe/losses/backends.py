"""Which backend computes the fused loss's chunks: ``generic`` (any device) or ``npu`` (torch_npu's fused CE).

``npu`` computes the CE part of each chunk with ``torch_npu.npu_cross_entropy_loss`` (CE and log-softmax in one
fused call; the CE gradient is then softmax - onehot from that log-softmax, and at temperature 1 the same softmax
serves the forward KL), instead of a logsumexp and a separate exp. It applies where the chunk's gradient has the
closed form (forward KL with the tail bucket or the full vocabulary, or plain CE as in SFT) with ``ce_weight > 0``;
other settings use the generic chunk. ``auto`` (the default) picks ``npu`` when the hidden states are on an NPU
and ``torch_npu`` has the op, and ``generic`` otherwise. The ``npu`` path is tested against the generic path and a
float64 reference with a CPU stand-in for the op (tests/npu_standin.py), not on Ascend hardware.

Nothing here imports ``torch_npu``: it is used only when something else has imported it already.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from kdpipe.accelerators.npu import is_npu_device
from kdpipe.losses.chunked import CEOp, closed_form_applies
from kdpipe.losses.settings import KDLossSettings

BACKENDS = ("auto", "generic", "npu")
NPU_CE_MAX_ROWS = 200_000  # torch_npu.npu_cross_entropy_loss takes at most this many rows per call


def npu_cross_entropy() -> Callable | None:
    """``torch_npu.npu_cross_entropy_loss`` when ``torch_npu`` is imported and has it, else None (never imports)."""
    module = sys.modules.get("torch_npu")
    return getattr(module, "npu_cross_entropy_loss", None) if module is not None else None


def npu_ce_op(fused_ce: Callable) -> CEOp:
    """(logits [N, V] float32, labels [N]) -> (CE [N], log-softmax [N, V]) from one fused torch_npu call."""

    def ce_and_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, log_prob, _, _ = fused_ce(logits, labels, reduction="none")
        return loss, log_prob

    return ce_and_log_softmax


def choose_backend(
    backend: str, hidden: torch.Tensor, settings: KDLossSettings, k: int, vocab: int, compute: torch.dtype
) -> tuple[str, str]:
    """The backend that computes this call (``generic`` or ``npu``) and why; see the module docstring.

    ``npu`` asked for explicitly fails (ValueError) without torch_npu's fused op or with the hidden states off the
    NPU; where the op does not apply (another divergence, ``ce_weight=0``, float64) it falls back to ``generic``.
    Whether the hidden states are on an NPU is asked of :mod:`kdpipe.accelerators` (whose device mapping the tests'
    CPU stand-in redirects; never an NPU without ``torch_npu`` imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "generic":
        return "generic", "backend=generic"
    on_npu, fused_ce = is_npu_device(hidden.device), npu_cross_entropy()
    if backend == "npu":
        if fused_ce is None:
            raise ValueError(
                "backend='npu' needs torch_npu (imported) with npu_cross_entropy_loss: install the kdpipe[ascend] "
                "extra and run on an NPU (docs/ascend.md), or use backend='auto' / 'generic'"
            )
        if not on_npu:
            raise ValueError(f"backend='npu' needs the hidden states on an NPU, got them on {hidden.device}")
    elif not on_npu:
        return "generic", f"hidden states on {hidden.device.type}"
    elif fused_ce is None:
        return "generic", "this torch_npu has no npu_cross_entropy_loss"
    if not closed_form_applies(settings, k, vocab):
        return "generic", f"divergence={settings.divergence}, tail={settings.tail}: autograd chunks, no fused CE"
    if settings.ce_weight <= 0.0:
        return "generic", "ce_weight=0: no CE term for the fused op"
    if compute != torch.float32:
        return "generic", f"{compute} compute: the fused op takes float32/float16/bfloat16"
    return "npu", "hidden states on an NPU"
