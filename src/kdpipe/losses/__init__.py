"""Losses: token cross-entropy and distillation against a sparse (top-k + tail) teacher."""

from kdpipe.losses.ce import token_cross_entropy
from kdpipe.losses.fused import FusedKDResult, fused_sparse_kd_loss, fused_sparse_kd_terms
from kdpipe.losses.kd import KDTerms, combine_terms, sparse_kd_loss, sparse_kd_terms

__all__ = [
    "FusedKDResult",
    "KDTerms",
    "combine_terms",
    "fused_sparse_kd_loss",
    "fused_sparse_kd_terms",
    "sparse_kd_loss",
    "sparse_kd_terms",
    "token_cross_entropy",
]
