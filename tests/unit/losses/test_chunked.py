"""The closed-form chunk losses equal per-chunk autograd (the reference) in float64, value and logit gradient,
for every divergence and tail mode; which one the fused loss picks."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdpipe.losses.chunked import Positions, autograd_chunk, bins_chunk, chunk_loss_for, closed_form_chunk
from kdpipe.losses.settings import DIVERGENCES, TAIL_MODES, KDLossSettings

N, V, K = 9, 30, 6


def positions(seed: int, ce_weight: float, tiny_tail: bool = False) -> tuple[torch.Tensor, Positions]:
    """A chunk's logits and positions; the weights carry the CE mix, as the fused loss makes them."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    lp, ids = teacher.topk(K, -1)
    if tiny_tail:  # the student puts almost all its mass on the teacher's top-k: the exact tail path
        logits.scatter_(-1, ids, 40.0 + torch.randn(N, K, generator=g, dtype=torch.float64))
    tail = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
    has_teacher = torch.ones(N, dtype=torch.bool)
    has_teacher[2] = False
    labels = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, generator=g, dtype=torch.float64)
    return logits, Positions(ids, lp, tail, labels, has_teacher, w * ce_weight, w * (1 - ce_weight))


@pytest.mark.parametrize(
    ("divergence", "tail", "temperature", "ce_weight", "tiny"),
    list(itertools.product(DIVERGENCES, TAIL_MODES, [1.0, 0.7], [0.0, 0.3], [False, True])),
)
def test_bins_chunk_equals_autograd(divergence, tail, temperature, ce_weight, tiny):
    logits, part = positions(hash((divergence, tail)) % 997, ce_weight, tiny_tail=tiny)
    settings = KDLossSettings(divergence=divergence, tail=tail, temperature=temperature, ce_weight=ce_weight, beta=0.3)
    want = autograd_chunk(logits.clone(), part, settings)
    got = bins_chunk(logits.clone(), part, settings)
    assert torch.allclose(got.loss, want.loss, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got.grad, want.grad, rtol=1e-8, atol=1e-11)
    assert torch.allclose(got.divergence, want.divergence, rtol=1e-10, atol=1e-12)


def test_forward_kl_keeps_its_written_out_gradient_and_the_rest_use_the_bins():
    settings = KDLossSettings(divergence="fkl", tail="bucket")
    assert chunk_loss_for(settings, K, V).func is closed_form_chunk
    for divergence, tail in itertools.product(DIVERGENCES, TAIL_MODES):
        if (divergence, tail) != ("fkl", "bucket"):
            chosen = chunk_loss_for(KDLossSettings(divergence=divergence, tail=tail), K, V).func
            assert chosen is bins_chunk, (divergence, tail)  # never the [n, V] autograd
