"""Losses: token cross-entropy and distillation against a sparse (top-k + tail) teacher.

``settings`` (what the loss is: :class:`KDLossSettings`), ``kd`` (the loss on logits), ``fused`` (the same loss
through the LM head, never holding the logits), built on ``chunked`` (the chunking base) and ``backends``.
"""

from kdpipe.losses.ce import token_cross_entropy
from kdpipe.losses.fused import FusedKDResult, fused_sparse_kd_loss, fused_sparse_kd_terms
from kdpipe.losses.kd import KDTerms, combine_terms, sparse_kd_loss, sparse_kd_terms
from kdpipe.losses.settings import KDLossSettings

__all__ = [
    "FusedKDResult",
    "KDLossSettings",
    "KDTerms",
    "combine_terms",
    "fused_sparse_kd_loss",
    "fused_sparse_kd_terms",
    "sparse_kd_loss",
    "sparse_kd_terms",
    "token_cross_entropy",
]
