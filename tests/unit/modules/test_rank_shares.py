"""The modules under DDP and FSDP: each rank's loss share averages to the global batch's loss and gradient, and
weight-decay groups survive FSDP's flattened parameters."""

from __future__ import annotations

import pytest
import torch

from kdpipe.losses import combine_terms, fused_sparse_kd_terms, sparse_kd_terms
from kdpipe.modules.sft import local_denominators, matrix_names, param_groups, rank_share
from kdpipe.types import IGNORE_INDEX


def _sparse_teacher(shape: tuple[int, int], vocab: int, k: int, generator: torch.Generator):
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(shape[0] * shape[1])])
    probs = torch.softmax(torch.randn(shape[0] * shape[1], k + 1, generator=generator, dtype=torch.float64), -1)
    return ids.view(*shape, k), probs[:, :k].log().view(*shape, k), probs[:, k].log().view(shape)


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_rank_shares_average_to_the_global_batch_loss_and_gradient(impl, normalize, ce_weight):
    """What DDP does with the ranks' losses (the mean of their gradients) gives the global batch's gradient,
    whatever the label and teacher positions per rank; one rank holds no label at all."""
    g = torch.Generator().manual_seed(0)
    rows, length, hidden_size, vocab, k, world = 6, 7, 8, 13, 4, 3
    hidden = torch.randn(rows, length, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < 0.4] = IGNORE_INDEX
    labels[[2, 5]] = IGNORE_INDEX  # rank 2's rows: nothing to learn
    has_teacher = (labels != IGNORE_INDEX) & (torch.rand(rows, length, generator=g) < 0.7)
    ids, logprobs, tail = _sparse_teacher((rows, length), vocab, k, g)
    options = {"normalize": normalize}

    def loss(part: list[int], weight_of_ce: float) -> torch.Tensor:
        batch = (ids[part], logprobs[part], tail[part], labels[part])
        if impl == "fused":
            return fused_sparse_kd_terms(
                hidden[part], weight, *batch, has_teacher=has_teacher[part], ce_weight=weight_of_ce, **options
            ).loss
        terms = sparse_kd_terms(hidden[part] @ weight.t(), *batch, has_teacher=has_teacher[part], ce_weight=ce_weight)
        return combine_terms(terms, ce_weight=weight_of_ce, **options)

    everything = loss(list(range(rows)), ce_weight)
    (expected,) = torch.autograd.grad(everything, weight)
    parts = [[0, 3], [1, 4], [2, 5]]
    local = [local_denominators(labels[p], has_teacher[p], normalize) for p in parts]
    total = torch.stack(local).sum(0)
    shares = [rank_share(n, total, ce_weight, world) for n in local]
    assert shares[2] == (0.0, ce_weight)
    losses = [scale * loss(p, w) for p, (scale, w) in zip(parts, shares)]
    averaged = sum(losses) / world
    (got,) = torch.autograd.grad(averaged, weight)
    assert torch.allclose(averaged, everything, atol=1e-12)
    assert torch.allclose(got, expected, atol=1e-12)


def test_weight_decay_groups_survive_fsdp_flattening():
    """FSDP hands the optimizer flat 1-D shards named through its wrappers: the names recorded before wrapping
    still pick the matrices."""
    matrices = matrix_names(torch.nn.Linear(3, 4))
    flat, inner = torch.nn.Module(), torch.nn.Module()
    flat._fsdp_wrapped_module = inner
    inner.weight = torch.nn.Parameter(torch.zeros(12))
    inner.bias = torch.nn.Parameter(torch.zeros(4))
    decay, no_decay = param_groups(flat, 0.1, matrices)
    assert decay["params"] == [inner.weight] and no_decay["params"] == [inner.bias]
    assert param_groups(flat, 0.1)[0]["params"] == []  # by shape alone nothing would be decayed
