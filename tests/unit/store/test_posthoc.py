"""Post-hoc k and temperature: a k-store read at k' equals a capture at k' (within the codec's error), the
re-tempered tail stays inside its bounds and its KL inside the stated bound, and a kd stage's teacher_k is
checked against its store before any training."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from kdpipe.modules.scorer import topk_signal
from kdpipe.pipeline.preflight import check_teacher_k
from kdpipe.pipeline.spec import StageSpec
from kdpipe.store import codec, posthoc
from kdpipe.store.reader import TeacherRows, TeacherStore
from tests.helpers import STORE_K, write_store


def teacher(n: int, vocab: int, s: float, gap_at: int | None = None, seed: int = 0) -> torch.Tensor:
    """float64 logits ``randn * s``; with ``gap_at``, the top ``gap_at`` tokens of each row raised by 4 nats so
    the top-k' set is not decided by ties within the codec's error."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * s
    if gap_at is not None:
        top = logits.topk(gap_at, dim=-1).indices
        logits.scatter_add_(1, top, torch.full(top.shape, 4.0, dtype=torch.float64))
    return logits


def rows_of(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherRows:
    labels = torch.arange(logits.shape[0]) % logits.shape[1]
    return TeacherRows(*topk_signal(logits, labels, k, temperature))


@pytest.mark.parametrize(("vocab", "k", "k_small"), [(100, 32, 8), (49152, 64, 16), (49152, 64, 63)])
def test_k_prime_from_a_k_store_equals_a_capture_at_k_prime(vocab, k, k_small):
    logits = teacher(128, vocab, 2.0, gap_at=k_small)
    exact = rows_of(logits, k_small)  # the float64 reference of a capture at k'
    spec = codec.make_spec(vocab, k)
    big = TeacherRows(*codec.round_trip(spec, *rows_of(logits, k).__dict__.values()))
    got = posthoc.truncate(big, k_small)
    assert got.topk_ids.shape == (128, k_small)
    assert torch.equal(got.topk_ids.sort(-1).values, exact.topk_ids.sort(-1).values)
    ref = codec.align(exact.topk_ids, exact.topk_logprobs, got.topk_ids)
    err = codec.kl_error(ref, exact.tail_logprob, got.topk_logprobs, got.tail_logprob)
    captured = TeacherRows(*codec.round_trip(codec.make_spec(vocab, k_small), *exact.__dict__.values()))
    ref_c = codec.align(exact.topk_ids, exact.topk_logprobs, captured.topk_ids)
    err_c = codec.kl_error(ref_c, exact.tail_logprob, captured.topk_logprobs, captured.tail_logprob)
    print(f"\nV={vocab} k={k} -> {k_small}: KL {err.mean():.2e} (captured at k': {err_c.mean():.2e})")
    assert err.mean() <= 1e-3 and err.max() <= 2e-3  # the codec's quantisation error, nothing more
    mass = got.topk_logprobs.double().exp().sum(-1) + got.tail_logprob.double().exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-3)


def test_truncate_is_exact_on_exact_rows():
    logits = teacher(64, 200, 3.0)
    got = posthoc.truncate(rows_of(logits, 40), 10)
    want = rows_of(logits, 10)
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert torch.allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-6)
    assert torch.allclose(got.tail_logprob, want.tail_logprob, atol=1e-6)
    same = rows_of(logits, 40)
    assert posthoc.truncate(same, 40) is same


@pytest.mark.parametrize("target", [0.5, 0.75, 1.5, 2.0])
@pytest.mark.parametrize(("vocab", "k", "s"), [(100, 16, 3.0), (5000, 64, 2.0), (5000, 64, 5.0)])
def test_retemper_top_k_exact_and_tail_within_bounds(vocab, k, s, target):
    logits = teacher(256, vocab, s, seed=3)
    stored = rows_of(logits, k, temperature=1.0)
    exact = rows_of(logits, k, temperature=target)  # a capture at T'
    got = posthoc.retemper(stored, 1.0, target, vocab)
    # the top-k entries relative to each other: exact
    rel_got = got.topk_logprobs.double() - got.topk_logprobs.double()[:, :1]
    rel_exact = exact.topk_logprobs.double() - exact.topk_logprobs.double()[:, :1]
    assert torch.allclose(rel_got, rel_exact, atol=1e-4)
    # the true tail weight sum_j p_j^a lies inside the bounds, and so does the estimate
    a = 1.0 / target
    lo, hi = posthoc.tail_bounds(stored.topk_logprobs, stored.tail_logprob, a, vocab)
    rest = torch.log_softmax(logits, -1).scatter(-1, stored.topk_ids, -math.inf)
    truth = torch.logsumexp(rest * a, dim=-1)
    assert ((truth >= lo - 1e-6) & (truth <= hi + 1e-6)).all()
    est = posthoc.tail_estimate(stored.topk_logprobs, stored.tail_logprob, a, vocab)
    assert ((est >= lo - 1e-9) & (est <= hi + 1e-9)).all()
    # the KL against the capture at T' is inside the stated bound, position by position
    err = codec.kl_error(exact.topk_logprobs, exact.tail_logprob, got.topk_logprobs, got.tail_logprob)
    bound = posthoc.tail_error_bound(stored.topk_logprobs, stored.tail_logprob, a, vocab)
    assert (err <= bound + 1e-5).all()
    # every log-prob (the label's too) is off by the normaliser's error alone: at most the bounds' width
    off = (got.label_logprob.double() - exact.label_logprob.double()).abs()
    assert (off <= (hi - lo).nan_to_num(0.0) + 1e-4).all()


def test_same_temperature_and_full_vocabulary():
    logits = teacher(32, 50, 2.0)
    rows = rows_of(logits, 10)
    assert posthoc.retemper(rows, 1.0, 1.0, 50) is rows
    full = posthoc.retemper(rows_of(logits, 50), 1.0, 2.0, 50)  # k = V: no tail, exact
    want = rows_of(logits, 50, temperature=2.0)
    assert torch.isneginf(full.tail_logprob).all()
    assert torch.allclose(full.topk_logprobs, want.topk_logprobs, atol=1e-5)


def test_a_store_read_post_hoc(tokenizer, tmp_path):
    from tests.helpers import encoded

    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    store = TeacherStore(tmp_path / "store")
    view = posthoc.PostHocStore(store, k=STORE_K - 2, temperature=2.0)
    rows, counts = view.get_many([e.id for e in examples[:3]])
    assert rows.topk_ids.shape == (sum(counts), STORE_K - 2) and view.k == STORE_K - 2
    mass = rows.topk_logprobs.double().exp().sum(-1) + rows.tail_logprob.double().exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-3)
    assert view.path == store.path and examples[0].id in view  # the rest passes through
    with pytest.raises(ValueError, match="teacher_k"):
        posthoc.PostHocStore(store, k=STORE_K + 1)


def test_preflight_refuses_teacher_k_above_the_score_stage_k():
    def spec(i, name, **cfg):
        return StageSpec(i, name, OmegaConf.create(cfg))

    specs = [
        spec(0, "score", kind="score", k=16, styles=["fast"], sequences="labels"),
        spec(1, "kd", kind="kd", style="fast", store="auto", teacher_k=8),
        spec(2, "kd_big", kind="kd", style="fast", store="auto", teacher_k=32),
    ]
    problems = check_teacher_k(specs)
    assert len(problems) == 1 and "pipeline.stages.kd_big.teacher_k=32" in problems[0] and "k=16" in problems[0]
