"""Sparse (top-k + tail) distillation losses against a plain float64 reference written out here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kdpipe.losses import KDLossSettings, combine_terms, sparse_kd_loss, sparse_kd_terms, token_cross_entropy
from kdpipe.losses.settings import DIVERGENCES, TAIL_MODES

IGN = -100


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- reference: explicit loops over Python floats --------------------------------------------------------------


def ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def ref_divergence(p: list[float], q: list[float], name: str, beta: float) -> float:
    """The divergence summed over bins; p and q need not be normalised (the ``ignore`` tail mode)."""
    if name == "fkl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, p)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if name == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skew_fkl":
        return ref_kl(p, [beta * x + (1 - beta) * y for x, y in zip(p, q)])
    assert name == "skew_rkl"
    return ref_kl(q, [beta * y + (1 - beta) * x for x, y in zip(p, q)])


def softmax(xs: list[float]) -> list[float]:
    mx = max(xs)
    e = [math.exp(x - mx) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def ref_bins(p_full: list[float], q_full: list[float], ids: list[int], tail: str) -> tuple[list[float], list[float]]:
    """The teacher and student bins of one position, built by hand."""
    p_top, q_top = [p_full[i] for i in ids], [q_full[i] for i in ids]
    if tail == "ignore":
        return p_top, q_top
    if tail == "renormalize":
        return [x / sum(p_top) for x in p_top], [x / sum(q_top) for x in q_top]
    rest = [i for i in range(len(p_full)) if i not in ids]
    if not rest:
        return p_top, q_top
    return [*p_top, sum(p_full[i] for i in rest)], [*q_top, sum(q_full[i] for i in rest)]


def make_batch(b=2, t=3, v=8, k=3, seed=0, dtype=torch.float64, labels=None):
    """Random student logits, a full teacher distribution, its top-k store and labels (some ignored)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    teacher_logp = torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2, -1)
    # distinct ids per position, in a shuffled (not sorted) order
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    lps = teacher_logp.gather(-1, ids)
    rest = torch.ones_like(teacher_logp, dtype=torch.bool).scatter(-1, ids, False)
    tail = teacher_logp.masked_fill(~rest, -math.inf).logsumexp(-1)
    if labels is None:
        labels = torch.randint(0, v, (b, t), generator=g)
        labels[0, 0] = IGN
    return student.to(dtype), ids, lps.to(dtype), tail.to(dtype), labels, teacher_logp.exp()


def ref_positions(student, ids, p_full, labels, name, beta, temperature=1.0, tail="bucket", scale=True):
    """Per-position reference divergence, 0 at ignored positions."""
    b, t, _ = student.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if labels[i, j] == IGN:
                continue
            q_full = softmax([x / temperature for x in student[i, j].double().tolist()])
            p, q = ref_bins(p_full[i, j].tolist(), q_full, ids[i, j].tolist(), tail)
            out[i, j] = ref_divergence(p, q, name, beta) * (temperature**2 if scale else 1.0)
    return out


def ref_ce(student, labels):
    b, t, _ = student.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if labels[i, j] != IGN:
                out[i, j] = -math.log(softmax(student[i, j].double().tolist())[int(labels[i, j])])
    return out


def token_mean(values, mask):
    return values[mask].sum().item() / mask.sum().item()


# ---- values ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
def test_full_vocab_bucket_is_the_full_divergence(name, beta, temperature):
    v = 7
    student, ids, lps, _, labels, p_full = make_batch(v=v, k=v, seed=1)
    tail = torch.full(labels.shape, -math.inf, dtype=torch.float64)
    loss = sparse_kd_loss(
        student, ids, lps, tail, labels, KDLossSettings(divergence=name, beta=beta, temperature=temperature)
    )
    ref = ref_positions(student, ids, p_full, labels, name, beta, temperature)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - token_mean(ref, labels != IGN)) < 1e-10


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_binned_divergence_matches_reference(name, tail, beta, temperature):
    student, ids, lps, tail_lp, labels, p_full = make_batch(v=9, k=4, seed=2)
    terms = sparse_kd_terms(
        student,
        ids,
        lps,
        tail_lp,
        labels,
        KDLossSettings(divergence=name, tail=tail, beta=beta, temperature=temperature),
    )
    ref = ref_positions(student, ids, p_full, labels, name, beta, temperature, tail)
    torch.testing.assert_close(terms.divergence, ref, rtol=0, atol=1e-10)
    loss = sparse_kd_loss(
        student,
        ids,
        lps,
        tail_lp,
        labels,
        KDLossSettings(divergence=name, tail=tail, beta=beta, temperature=temperature),
    )
    assert abs(loss.item() - token_mean(ref, labels != IGN)) < 1e-10


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_scale_by_t2_can_be_turned_off(temperature):
    student, ids, lps, tail, labels, p_full = make_batch(seed=3)
    loss = sparse_kd_loss(student, ids, lps, tail, labels, KDLossSettings(temperature=temperature, scale_by_t2=False))
    ref = ref_positions(student, ids, p_full, labels, "fkl", 0.5, temperature, scale=False)
    assert abs(loss.item() - token_mean(ref, labels != IGN)) < 1e-10


def test_beta_limits_are_zero_fkl_and_rkl():
    batch = make_batch(seed=4)

    def kd(**kw) -> float:
        return sparse_kd_loss(*batch[:5], KDLossSettings(**kw)).item()

    assert kd(divergence="jsd", beta=0.0) == 0.0 == kd(divergence="jsd", beta=1.0)
    assert kd(divergence="skew_fkl", beta=1.0) == 0.0 == kd(divergence="skew_rkl", beta=1.0)
    assert kd(divergence="skew_fkl", beta=0.0) == pytest.approx(kd(divergence="fkl"), abs=1e-12)
    assert kd(divergence="skew_rkl", beta=0.0) == pytest.approx(kd(divergence="rkl"), abs=1e-12)
    # the zero limits still backpropagate (to zero gradients)
    student = batch[0].clone().requires_grad_(True)
    sparse_kd_loss(student, *batch[1:5], KDLossSettings(divergence="jsd", beta=1.0)).backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


# ---- CE, reductions, masks -------------------------------------------------------------------------------------


def test_ce_weight_one_is_token_cross_entropy():
    student, ids, lps, tail, labels, _ = make_batch(seed=5, dtype=torch.float32)
    loss = sparse_kd_loss(
        student, ids, lps, tail, labels, KDLossSettings(ce_weight=1.0, divergence="rkl", temperature=2.0)
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, token_cross_entropy(student, labels), rtol=0, atol=0)
    x, y = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    sparse_kd_loss(x, ids, lps, tail, labels, KDLossSettings(ce_weight=1.0)).backward()
    token_cross_entropy(y, labels).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_ce_weight_mixes_ce_and_divergence(ce_weight, name):
    student, ids, lps, tail, labels, p_full = make_batch(seed=6)
    loss = sparse_kd_loss(
        student, ids, lps, tail, labels, KDLossSettings(ce_weight=ce_weight, divergence=name, temperature=2.0)
    )
    mask = labels != IGN
    div = token_mean(ref_positions(student, ids, p_full, labels, name, 0.5, 2.0), mask)
    ce = token_mean(ref_ce(student, labels), mask)
    assert abs(loss.item() - (ce_weight * ce + (1 - ce_weight) * div)) < 1e-10
    terms = sparse_kd_terms(student, ids, lps, tail, labels)
    torch.testing.assert_close(terms.ce, ref_ce(student, labels), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_token_and_sequence_normalization(ce_weight):
    labels = torch.tensor([[1, 2, 3, 4], [IGN, 5, IGN, IGN], [IGN] * 4])  # 4, 1 and 0 label positions
    student, ids, lps, tail, labels, p_full = make_batch(b=3, t=4, seed=7, labels=labels)
    div = ref_positions(student, ids, p_full, labels, "fkl", 0.5)
    ce = ref_ce(student, labels)
    mix = ce_weight * ce + (1 - ce_weight) * div
    token = mix.sum().item() / 5
    sequence = (mix[0].sum().item() / 4 + mix[1].sum().item() / 1) / 2  # the empty row does not count
    assert token != pytest.approx(sequence)
    got_token = sparse_kd_loss(student, ids, lps, tail, labels, KDLossSettings(ce_weight=ce_weight, normalize="token"))
    got_seq = sparse_kd_loss(student, ids, lps, tail, labels, KDLossSettings(ce_weight=ce_weight, normalize="sequence"))
    assert abs(got_token.item() - token) < 1e-10
    assert abs(got_seq.item() - sequence) < 1e-10


def test_flat_input_matches_batched_and_rejects_sequence():
    student, ids, lps, tail, labels, _ = make_batch(seed=8)
    batched = sparse_kd_loss(student, ids, lps, tail, labels, KDLossSettings(divergence="jsd", ce_weight=0.3))
    v, k = student.shape[-1], ids.shape[-1]
    flat = sparse_kd_loss(
        student.reshape(-1, v),
        ids.reshape(-1, k),
        lps.reshape(-1, k),
        tail.reshape(-1),
        labels.reshape(-1),
        KDLossSettings(divergence="jsd", ce_weight=0.3),
    )
    torch.testing.assert_close(flat, batched, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="sequence"):
        flat_args = (student.reshape(-1, v), ids.reshape(-1, k), lps.reshape(-1, k), tail.reshape(-1))
        sparse_kd_loss(*flat_args, labels.reshape(-1), KDLossSettings(normalize="sequence"))


@pytest.mark.parametrize("tail_mode", TAIL_MODES)
def test_ignored_positions_do_not_count(tail_mode):
    student, ids, lps, tail, labels, _ = make_batch(seed=9)
    labels[1, 2] = IGN
    base = sparse_kd_loss(
        student, ids, lps, tail, labels, KDLossSettings(tail=tail_mode, ce_weight=0.3, divergence="rkl")
    )
    # anything at ignored positions, garbage teacher data included, changes nothing and gets no gradient
    student2 = student.clone()
    student2[0, 0] = 50.0
    student2[1, 2] = -3.0
    lps2, ids2, tail2 = lps.clone(), ids.clone(), tail.clone()
    lps2[0, 0], ids2[0, 0], tail2[0, 0] = float("nan"), -1, float("nan")
    student2.requires_grad_(True)
    loss = sparse_kd_loss(
        student2, ids2, lps2, tail2, labels, KDLossSettings(tail=tail_mode, ce_weight=0.3, divergence="rkl")
    )
    torch.testing.assert_close(loss, base, rtol=0, atol=1e-12)
    loss.backward()
    assert torch.isfinite(student2.grad).all()
    assert not student2.grad[0, 0].any() and not student2.grad[1, 2].any()


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_positions_without_teacher_get_ce_only(normalize):
    labels = torch.tensor([[1, 2, 3, IGN], [4, 5, 6, 7]])
    student, ids, lps, tail, labels, p_full = make_batch(b=2, t=4, seed=10, labels=labels)
    has_teacher = torch.tensor([[True, False, True, True], [False, False, False, False]])
    ids[~has_teacher], lps[~has_teacher], tail[~has_teacher] = -1, float("nan"), float("nan")  # no data there
    student.requires_grad_(True)
    ce_weight = 0.4
    loss = sparse_kd_loss(
        student,
        ids,
        lps,
        tail,
        labels,
        KDLossSettings(ce_weight=ce_weight, normalize=normalize),
        has_teacher=has_teacher,
    )
    div = ref_positions(student.detach(), ids.clamp(min=0), p_full, labels, "fkl", 0.5)
    ce = ref_ce(student.detach(), labels)
    if normalize == "token":
        div_mean = (div[0, 0] + div[0, 2]).item() / 2  # label positions with teacher data only
        ce_mean = ce.sum().item() / 7  # all label positions
    else:
        div_mean = (div[0, 0] + div[0, 2]).item() / 2  # row 1 has no teacher position: left out of the mean
        ce_mean = (ce[0].sum().item() / 3 + ce[1].sum().item() / 4) / 2
    assert abs(loss.item() - (ce_weight * ce_mean + (1 - ce_weight) * div_mean)) < 1e-10
    loss.backward()
    assert torch.isfinite(student.grad).all()
    terms = sparse_kd_terms(student, ids, lps, tail, labels, has_teacher=has_teacher)
    assert torch.equal(terms.mask, labels != IGN)
    assert torch.equal(terms.kd_mask, (labels != IGN) & has_teacher)
    assert not terms.divergence[~terms.kd_mask].any() and not terms.topk_mass[~terms.kd_mask].any()
    assert not terms.top1_agree[~terms.kd_mask].any()


def test_diagnostics():
    student, ids, lps, tail, labels, p_full = make_batch(seed=11, v=6, k=2)
    # make the student agree with the teacher's top-1 at one position and disagree at another
    top1 = ids.gather(-1, lps.argmax(-1, keepdim=True)).squeeze(-1)
    student[0, 1] = -5.0
    student[0, 1, top1[0, 1]] = 5.0
    student[1, 0] = 0.0
    student[1, 0, (top1[1, 0] + 1) % 6] = 5.0
    terms = sparse_kd_terms(student, ids, lps, tail, labels)
    assert terms.top1_agree[0, 1] and not terms.top1_agree[1, 0]
    assert not terms.top1_agree[0, 0]  # ignored
    mass = p_full.gather(-1, ids).sum(-1)
    mask = labels != IGN
    torch.testing.assert_close(terms.topk_mass[mask], mass[mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(terms.topk_mass + tail.exp(), torch.ones_like(tail).masked_fill(~mask, tail[0, 0].exp()))


def test_low_precision_input_computes_in_float32():
    student, ids, lps, tail, labels, p_full = make_batch(seed=12)
    loss = sparse_kd_loss(student.bfloat16(), ids, lps.float(), tail.float(), labels, KDLossSettings(divergence="jsd"))
    assert loss.dtype == torch.float32
    ref = ref_positions(student.bfloat16(), ids, p_full, labels, "jsd", 0.5)
    assert loss.item() == pytest.approx(token_mean(ref, labels != IGN), abs=1e-5)


# ---- gradients and non-finite teacher data ---------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_gradcheck(name, tail):
    student, ids, lps, tail_lp, labels, _ = make_batch(b=2, t=2, v=6, k=3, seed=13)
    student.requires_grad_(True)

    def f(x):
        return sparse_kd_loss(
            x, ids, lps, tail_lp, labels, KDLossSettings(divergence=name, tail=tail, beta=0.3, temperature=1.7)
        )

    assert torch.autograd.gradcheck(f, (student,))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck_full_vocab_with_ce(name):
    student, ids, lps, _, labels, _ = make_batch(b=1, t=3, v=6, k=6, seed=14)
    tail = torch.full(labels.shape, -math.inf, dtype=torch.float64)
    student.requires_grad_(True)

    def f(x):
        return sparse_kd_loss(
            x, ids, lps, tail, labels, KDLossSettings(divergence=name, ce_weight=0.3, normalize="sequence")
        )

    assert torch.autograd.gradcheck(f, (student,))


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("k", [3, 6])
def test_zero_mass_teacher_bins_give_no_nan(name, tail, k):
    v = 6
    student, ids, lps, tail_lp, labels, _ = make_batch(b=2, t=3, v=v, k=k, seed=15)
    # teacher puts no mass on some of its top-k ids, and all its mass in the top-k at one position (tail -inf)
    lps[0, 1, -1] = -math.inf
    lps[1, 2, 0] = -math.inf
    lps[1, 0] = torch.log_softmax(lps[1, 0], -1)
    tail_lp[1, 0] = -math.inf
    if k == v:
        tail_lp[:] = -math.inf
    lps[0, 1] = torch.log_softmax(lps[0, 1], -1) + math.log1p(-tail_lp[0, 1].exp())
    for beta in (0.0, 0.5, 1.0):
        x = student.clone().requires_grad_(True)
        terms = sparse_kd_terms(
            x, ids, lps, tail_lp, labels, KDLossSettings(divergence=name, tail=tail, beta=beta, temperature=2.0)
        )
        loss = sparse_kd_loss(
            x, ids, lps, tail_lp, labels, KDLossSettings(divergence=name, tail=tail, beta=beta, temperature=2.0)
        )
        assert torch.isfinite(terms.divergence).all() and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(x.grad).all()
    if name == "fkl" and tail != "ignore":  # zero-mass bins contribute nothing: the reference skips them
        p_full = torch.zeros(2, 3, v, dtype=torch.float64).scatter(-1, ids, lps.exp())
        rest = torch.ones(2, 3, v, dtype=torch.bool).scatter(-1, ids, False)
        p_full += rest * (tail_lp.exp() / rest.sum(-1).clamp(min=1)).unsqueeze(-1)  # any split of the tail
        ref = ref_positions(student, ids, p_full, labels, name, 0.5, 2.0, tail)
        torch.testing.assert_close(terms.divergence, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("k", [4, 5, 6])
def test_vocab_masked_on_both_sides_gives_no_nan(name, tail, k):
    """A vocabulary entry with -inf student logits and zero teacher mass (padded vocab): an empty bin, no NaN."""
    v = 6
    student, ids, lps, tail_lp, labels, p_full = make_batch(b=2, t=2, v=v, k=k, seed=18)
    p_full[..., v - 1] = 0.0
    p_full /= p_full.sum(-1, keepdim=True)
    student[..., v - 1] = -math.inf
    if k == 5:  # the masked entry is the whole tail
        ids = torch.arange(v - 1).expand(2, 2, k)
    lps = p_full.gather(-1, ids).log()
    tail_lp = torch.log(1 - lps.exp().sum(-1)).clamp(max=-math.inf if k >= 5 else 0.0)
    for beta in (0.0, 0.3, 1.0):
        x = student.clone().requires_grad_(True)
        loss = sparse_kd_loss(
            x, ids, lps, tail_lp, labels, KDLossSettings(divergence=name, tail=tail, beta=beta, temperature=1.5)
        )
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        ref = ref_positions(student, ids, p_full, labels, name, beta, 1.5, tail)
        assert abs(loss.item() - token_mean(ref, labels != IGN)) < 1e-10


def test_full_vocab_ignores_a_rounding_tail():
    """With k = V the tail is empty by construction: a teacher tail of rounding noise changes nothing."""
    student, ids, lps, tail, labels, p_full = make_batch(v=6, k=6, seed=19)
    noisy = torch.full_like(tail, math.log(1e-16))
    for name in DIVERGENCES:
        loss = sparse_kd_loss(student, ids, lps, noisy, labels, KDLossSettings(divergence=name))
        ref = ref_positions(student, ids, p_full, labels, name, 0.5)
        assert abs(loss.item() - token_mean(ref, labels != IGN)) < 1e-10


# ---- argument checking -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"divergence": "kl"}, "divergence 'kl'.*fkl, rkl, jsd, skew_fkl, skew_rkl, tvd"),
        ({"tail": "drop"}, "tail 'drop'.*bucket, renormalize, ignore"),
        ({"normalize": "batch"}, "normalize 'batch'.*token, sequence"),
        ({"beta": 1.5}, r"beta must be in \[0, 1\], got 1.5"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\], got -0.1"),
        ({"beta": "0.5"}, "beta must be a number"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"ce_weight": -0.1}, r"ce_weight must be in \[0, 1\], got -0.1"),
        ({"ce_weight": 1.5}, r"ce_weight must be in \[0, 1\], got 1.5"),
        ({"ce_weight": True}, "ce_weight must be a number"),
        ({"scale_by_t2": "yes"}, "scale_by_t2 must be true or false"),
        ({"ignore_index": 1.5}, "ignore_index must be an integer"),
    ],
)
def test_settings_refuse_bad_values_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDLossSettings(**kwargs)
    with pytest.raises(ValueError, match=match):  # a change of good settings is validated again
        KDLossSettings().replace(**kwargs)
    batch = make_batch(seed=16)
    with pytest.raises(ValueError, match=match):  # the loss functions' keyword overrides go through them too
        sparse_kd_loss(*batch[:5], **kwargs)


def test_settings_from_a_loss_config():
    cfg = {"divergence": "jsd", "beta": 0, "temperature": 2, "ce_weight": 1, "tail": "renormalize"}
    settings = KDLossSettings(**cfg)  # YAML integers become floats
    assert (settings.beta, settings.temperature, settings.ce_weight) == (0.0, 2.0, 1.0)
    assert isinstance(settings.temperature, float) and settings.normalize == "token"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.ce_weight = 0.5
    with pytest.raises(TypeError, match="chunk_size"):
        KDLossSettings(**cfg, chunk_size=4)  # not a loss setting
    batch = make_batch(seed=16)
    with pytest.raises(TypeError, match="settings must be a KDLossSettings"):
        sparse_kd_loss(*batch[:5], cfg)


def test_keyword_overrides_equal_settings_and_terms_keep_theirs():
    student, ids, lps, tail, labels, _ = make_batch(seed=20)
    settings = KDLossSettings(divergence="jsd", beta=0.3, ce_weight=0.4, normalize="sequence")
    loss = sparse_kd_loss(student, ids, lps, tail, labels, settings)
    same = sparse_kd_loss(
        student, ids, lps, tail, labels, divergence="jsd", beta=0.3, ce_weight=0.4, normalize="sequence"
    )
    assert torch.equal(loss, same)
    changed = sparse_kd_loss(student, ids, lps, tail, labels, settings, ce_weight=0.0)
    assert torch.equal(changed, sparse_kd_loss(student, ids, lps, tail, labels, settings.replace(ce_weight=0.0)))
    terms = sparse_kd_terms(student, ids, lps, tail, labels, settings)
    assert terms.settings == settings and torch.equal(combine_terms(terms), loss)
    assert torch.equal(combine_terms(terms, ce_weight=0.0), changed)  # reduced by other settings when told


def test_bad_shapes_raise():
    student, ids, lps, tail, labels, _ = make_batch(b=2, t=3, v=8, k=3, seed=17)
    with pytest.raises(ValueError, match=r"labels shape \(2, 2\)"):
        sparse_kd_loss(student, ids, lps, tail, labels[:, :2])
    with pytest.raises(ValueError, match=r"topk_ids shape \(2, 2, 3\)"):
        sparse_kd_loss(student, ids[:, :2], lps, tail, labels)
    with pytest.raises(ValueError, match=r"topk_logprobs shape \(2, 3, 2\)"):
        sparse_kd_loss(student, ids, lps[..., :2], tail, labels)
    with pytest.raises(ValueError, match=r"tail_logprob shape \(2, 3, 1\)"):
        sparse_kd_loss(student, ids, lps, tail.unsqueeze(-1), labels)
    with pytest.raises(ValueError, match=r"has_teacher shape \(2,\)"):
        sparse_kd_loss(student, ids, lps, tail, labels, has_teacher=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"top-k size 9"):
        big = torch.zeros(2, 3, 9, dtype=torch.long)
        sparse_kd_loss(student, big, big.double(), tail, labels)
    with pytest.raises(ValueError, match=r"\[B, T, V\] or \[N, V\]"):
        sparse_kd_loss(student[0, 0], ids[0, 0], lps[0, 0], tail[0, 0], labels[0, 0])
