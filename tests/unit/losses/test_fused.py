"""The fused LM-head loss equals the plain loss on materialised logits, in value and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdpipe.losses import (
    KDLossSettings,
    fused_sparse_kd_loss,
    fused_sparse_kd_terms,
    sparse_kd_loss,
    token_cross_entropy,
)
from kdpipe.losses.settings import DIVERGENCES, TAIL_MODES

B, T, H, V, K = 2, 7, 8, 24, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def make_case(seed: int, dtype=torch.float64, k: int = K, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, dim=-1)
    lp, ids = teacher.topk(k, dim=-1)
    rest = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    has_teacher = torch.ones(B, T, dtype=torch.bool)
    has_teacher[1, 1] = False  # a label position without teacher data: CE only
    leaves = [hidden.to(dtype), weight.to(dtype)] + ([b.to(dtype)] if bias else [])
    leaves = [x.clone().requires_grad_(True) for x in leaves]
    return leaves, (ids, lp.to(torch.float32), rest.to(torch.float32), labels, has_teacher)


def reference(leaves, teacher, **opts):
    """The plain path in float64: materialise the logits, call sparse_kd_loss, autograd (``opts``: the fields of
    ``KDLossSettings``)."""
    leaves64 = [x.detach().double().requires_grad_(True) for x in leaves]
    h, w, *b = leaves64
    logits = h @ w.t() + (b[0] if b else 0.0)
    ids, lp, tail, labels, has_teacher = teacher
    settings = KDLossSettings(**opts)
    loss = sparse_kd_loss(logits, ids, lp.double(), tail.double(), labels, settings, has_teacher=has_teacher)
    grads = torch.autograd.grad(loss, leaves64)
    return loss.detach(), grads


def fused(leaves, teacher, chunk_size=4, backend="auto", **opts):
    """The fused loss and its gradients (``opts``: the fields of ``KDLossSettings``)."""
    h, w, *b = leaves
    ids, lp, tail, labels, has_teacher = teacher
    loss = fused_sparse_kd_loss(
        h,
        w,
        ids,
        lp,
        tail,
        labels,
        KDLossSettings(**opts),
        lm_head_bias=b[0] if b else None,
        has_teacher=has_teacher,
        chunk_size=chunk_size,
        backend=backend,
    )
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def assert_close(got, want, rtol, atol=1e-9):
    assert torch.allclose(got.double(), want, rtol=rtol, atol=atol), (got, want)


CASES = list(itertools.product(DIVERGENCES, TAIL_MODES, [1.0, 2.0], [0.0, 0.4, 1.0]))


@pytest.mark.parametrize(("divergence", "tail", "temperature", "ce_weight"), CASES)
def test_fused_equals_plain_float32(divergence, tail, temperature, ce_weight):
    leaves, teacher = make_case(seed=hash((divergence, tail)) % 1000, dtype=torch.float32)
    opts = dict(divergence=divergence, tail=tail, temperature=temperature, ce_weight=ce_weight, beta=0.3)
    ref_loss, ref_grads = reference(leaves, teacher, **opts)
    loss, grads = fused(leaves, teacher, **opts)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_fused_equals_plain_float64_exactly(divergence, normalize):
    leaves, teacher = make_case(seed=7)
    opts = dict(divergence=divergence, normalize=normalize, ce_weight=0.25)
    ref_loss, ref_grads = reference(leaves, teacher, **opts)
    for chunk_size in (1, 3, 1000):  # one chunk per position, uneven chunks, one chunk
        loss, grads = fused(leaves, teacher, chunk_size=chunk_size, **opts)
        assert_close(loss, ref_loss, rtol=1e-12)
        for got, want in zip(grads, ref_grads):
            assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_full_vocabulary_no_bias_and_tied_weights():
    leaves, teacher = make_case(seed=3, k=V, bias=False)
    ref_loss, ref_grads = reference(leaves, teacher, divergence="fkl", ce_weight=0.5)
    loss, grads = fused(leaves, teacher, divergence="fkl", ce_weight=0.5)
    assert_close(loss, ref_loss, rtol=1e-12)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=1e-10, atol=1e-12)
    # tied embeddings: the weight is also used as the input embedding; gradients from both uses add up
    emb = torch.nn.Embedding(V, H, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    _, (_, _, _, labels, _) = make_case(seed=3)
    h = emb(ids)
    loss = fused_sparse_kd_loss(h, emb.weight, None, None, None, labels, KDLossSettings(ce_weight=1.0), chunk_size=4)
    loss.backward()
    emb2 = torch.nn.Embedding(V, H, dtype=torch.float64)
    emb2.weight.data.copy_(emb.weight.data)
    h2 = emb2(ids)
    logits = h2 @ emb2.weight.t()  # float64 reference (token_cross_entropy itself works in float32)
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100).backward()
    assert torch.allclose(emb.weight.grad, emb2.weight.grad, rtol=1e-9, atol=1e-10)


def test_plain_fused_cross_entropy_equals_token_cross_entropy():
    leaves, (_, _, _, labels, _) = make_case(seed=5, dtype=torch.float32)
    h, w, b = leaves
    loss = fused_sparse_kd_loss(
        h, w, None, None, None, labels, KDLossSettings(ce_weight=1.0), lm_head_bias=b, chunk_size=3
    )
    logits = h.double() @ w.double().t() + b.double()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert_close(loss.detach(), ref.detach(), rtol=1e-6)
    assert_close(token_cross_entropy(logits, labels).detach(), ref.detach(), rtol=1e-6)
    with pytest.raises(ValueError, match="only plain cross-entropy"):
        fused_sparse_kd_loss(h, w, None, None, None, labels, KDLossSettings(ce_weight=0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_half_precision_parameters_within_stated_tolerance(dtype, divergence):
    """bf16/fp16 hidden states and weight: logits made in float32 from the half values; loss within 1e-3
    relative, gradients within 2e-2 relative (their norm) of the float64 reference on the same half values."""
    leaves, teacher = make_case(seed=11, dtype=dtype)
    opts = dict(divergence=divergence, ce_weight=0.3)
    ref_loss, ref_grads = reference(leaves, teacher, **opts)
    loss, grads = fused(leaves, teacher, **opts)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert abs(float(loss) - float(ref_loss)) <= 1e-3 * abs(float(ref_loss))
    for got, want in zip(grads, ref_grads):
        assert float((got.double() - want).norm()) <= 2e-2 * float(want.norm())


def test_diagnostics_and_no_label_positions():
    leaves, teacher = make_case(seed=2, dtype=torch.float32)
    h, w, b = leaves
    ids, lp, tail, labels, has_teacher = teacher
    result = fused_sparse_kd_terms(h, w, ids, lp, tail, labels, lm_head_bias=b, has_teacher=has_teacher)
    n_labels = int((labels != -100).sum())
    assert result.ce.shape == result.divergence.shape == (n_labels,)
    assert int(result.kd_mask.sum()) == n_labels - 1
    assert ((result.topk_mass > 0) & (result.topk_mass <= 1 + 1e-6))[result.kd_mask].all()
    empty = torch.full_like(labels, -100)
    loss = fused_sparse_kd_loss(h, w, ids, lp, tail, empty, lm_head_bias=b)
    assert float(loss) == 0.0
    loss.backward()  # a zero loss still backpropagates
    assert float(h.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_confident_student_with_a_tiny_tail_stays_exact(temperature):
    """Rows where the student's tail mass is tiny take the exact (masked logsumexp) path."""
    leaves, (_, _, _, labels, has_teacher) = make_case(seed=13)
    h, w, b = leaves
    with torch.no_grad():
        h[0].mul_(25.0)  # sequence 0: a very confident student; sequence 1 stays soft
        z = (h @ w.t() + b) / temperature
        teacher = torch.log_softmax(z * 0.8, dim=-1)  # a teacher that agrees on the top tokens
        lp, ids = teacher.topk(K, dim=-1)
        tail = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
        q_tail = 1 - torch.softmax(z, -1).gather(-1, ids).sum(-1)
    assert (q_tail < 1e-3).any() and (q_tail > 1e-3).any()  # both branches are exercised
    teacher = (ids, lp.float(), tail.float(), labels, has_teacher)
    opts = dict(divergence="fkl", ce_weight=0.2, temperature=temperature)
    ref_loss, ref_grads = reference(leaves, teacher, **opts)
    loss, grads = fused(leaves, teacher, **opts)
    assert_close(loss, ref_loss, rtol=1e-9)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=1e-7, atol=1e-9)
