"""Teacher-store codec v2 (sorted-ans-v2, the default): exact id sets, KL error, bytes per entry, random access by
example, zero mass, determinism, and the quantiser's error bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdpipe.store import codec, codec_v2
from kdpipe.store.codec import CodecSpec, align, decode, encode_shard, kl_error, make_spec, open_shard, prepare
from tests.unit.store.test_codec_v1 import case, store_fields, teacher_logprobs


def shard_of(spec: CodecSpec, ids, lps, tail, label, per_example: int):
    """Encode rows as consecutive examples of ``per_example`` rows; returns (arrays, shard, n_examples)."""
    n = ids.shape[0]
    parts = [
        prepare(
            spec,
            ids[a : a + per_example],
            lps[a : a + per_example],
            tail[a : a + per_example],
            label[a : a + per_example],
        )
        for a in range(0, n, per_example)
    ]
    arrays = encode_shard(spec, parts)
    return arrays, open_shard(spec, codec._Arrays(arrays)), len(parts)


def check_round_trip(ids, lps, tail, label, got, kl_bound=1e-3):
    d_ids, d_lp, d_tail, d_label = got
    assert d_ids.dtype == torch.int64 and d_lp.dtype == d_tail.dtype == d_label.dtype == torch.float32
    assert torch.equal(d_ids.sort(-1).values, ids.sort(-1).values)  # the same id sets, exactly
    assert (d_ids[:, :-1] < d_ids[:, 1:]).all()  # entries in id order
    want = align(ids, lps, d_ids)
    err = kl_error(want, tail, d_lp, d_tail)
    assert torch.isfinite(err).all() and err.mean() <= kl_bound
    mass = d_lp.double().exp().sum(-1) + d_tail.double().exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-3)
    finite = label > -6e4  # within the float16 range (below it: -inf)
    assert torch.allclose(d_label[finite], label[finite], rtol=1e-3, atol=1e-3)  # float16
    return err


@pytest.mark.parametrize("s", [1.0, 3.0, 8.0])
@pytest.mark.parametrize(("vocab", "n"), [(100, 512), (49152, 256), (153376, 64)])
def test_ids_exact_and_kl_small(vocab, n, s):
    ids, vals, tail, label = case(vocab, n, s)
    spec = make_spec(vocab, 64)
    _, shard, count = shard_of(spec, ids, vals, tail, label, per_example=32)
    err = check_round_trip(ids, vals, tail, label, decode(spec, [shard.rows(i) for i in range(count)]))
    print(f"\nV={vocab} s={s}: KL mean {err.mean():.2e} max {err.max():.2e} nats")
    assert err.max() <= 2e-3


def test_spec_is_v2_by_default_and_round_trips_through_json():
    spec = make_spec(49152, 64)
    assert spec == CodecSpec(49152, 64, codec_v2.SCHEME, step=codec_v2.DEFAULT_STEP)
    assert make_spec(49152, 128).step == pytest.approx(codec_v2.DEFAULT_STEP / math.sqrt(2))
    assert spec.to_dict() == {"vocab_size": 49152, "k": 64, "scheme": "sorted-ans-v2", "step": codec_v2.DEFAULT_STEP}
    assert CodecSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="exactly the keys"):
        CodecSpec.from_dict({**spec.to_dict(), "logprob_bits": 7})  # a v1 field in a v2 spec
    with pytest.raises(ValueError):
        CodecSpec(100, 8, codec_v2.SCHEME)  # no step
    with pytest.raises(ValueError):
        CodecSpec(100, 8, codec_v2.SCHEME, step=0.0)


@pytest.mark.parametrize(("vocab", "bound"), [(49152, 2.0), (153376, 2.3)])
def test_bytes_per_entry_of_uniformly_random_ids(vocab, bound):
    """The synthetic teacher's ids are uniform: at least log2 C(V, 64) / 64 bits each; the whole entry fits."""
    from kdpipe.benchmarks.store import synthetic_teacher

    _, lps, tail, label = (t.repeat(8, *[1] * (t.dim() - 1)) for t in synthetic_teacher(1024, vocab, 64, seed=1))
    rng = np.random.default_rng(0)  # the same values under 8 x 1024 rows of fresh uniformly random ids
    ids = torch.from_numpy(np.stack([rng.choice(vocab, 64, replace=False) for _ in range(lps.shape[0])]))
    arrays, _, _ = shard_of(make_spec(vocab, 64), ids, lps, tail, label, per_example=64)
    per_entry = codec.encoded_nbytes(arrays) / ids.numel()
    floor = (math.lgamma(vocab + 1) - math.lgamma(65) - math.lgamma(vocab - 63)) / math.log(2) / 64 / 8
    print(f"\nV={vocab}: {per_entry:.3f} bytes per entry (ids alone at least {floor:.3f})")
    assert floor < per_entry <= bound


def test_any_example_decodes_alone_and_in_any_order():
    ids, vals, tail, label = case(49152, 256, 3.0)
    spec = make_spec(49152, 64)
    _, shard, count = shard_of(spec, ids, vals, tail, label, per_example=24)  # 10 full examples and one of 16
    whole = decode(spec, [shard.rows(i) for i in range(count)])
    starts = [24 * i for i in range(count)] + [256]
    for i in [10, 3, 0, 7]:
        alone = decode(spec, [shard.rows(i)])
        for a, w in zip(alone, whole):
            assert torch.equal(a, w[starts[i] : starts[i + 1]])
    mixed = decode(spec, [shard.rows(5), shard.rows(1)])
    assert torch.equal(mixed[0], torch.cat([whole[0][120:144], whole[0][24:48]]))


def test_encoding_is_deterministic():
    ids, vals, tail, label = case(100, 512, 3.0)
    spec = make_spec(100, 64)
    a, _, _ = shard_of(spec, ids, vals, tail, label, per_example=50)
    b, _, _ = shard_of(spec, ids.clone(), vals.clone(), tail.clone(), label.clone(), per_example=50)
    assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("vocab", [2, 100, 1 << 16, (1 << 16) + 1, 1 << 17, 153376])
def test_ids_at_the_edges_are_exact(vocab):
    """First and last ids, neighbours, and gaps at powers of two."""
    k = 2 if vocab == 2 else 8
    rows = (
        [[0, 1], [1, 0]]
        if vocab == 2
        else [
            [0, 1, 2, 3, vocab - 4, vocab - 3, vocab - 2, vocab - 1],
            [vocab - 1, 0, 4, 8, 16, (1 << 10) % vocab, ((1 << 10) + 1) % vocab, vocab // 2],
            [5, 6, 7, 9, 13, 21, 37, 69],
        ]
    )
    ids = torch.tensor(rows)
    lps = torch.log_softmax(torch.randn(len(rows), k), -1) - 0.1
    tail = torch.full((len(rows),), math.log(1 - math.exp(-0.1)))
    got = codec.round_trip(make_spec(vocab, k), ids, lps, tail, torch.full((len(rows),), -1.0))
    assert torch.equal(got[0].sort(-1).values, ids.sort(-1).values)


def test_zero_mass_and_k_equal_to_vocab():
    lp = teacher_logprobs(32, 100, 3.0, seed=7)
    lp[:, :20] = -math.inf  # masked tokens
    lp[:, 20:25] = torch.finfo(torch.float32).min  # masked with the most negative float instead of -inf
    lp[:, 25] = -300.0  # tiny but not zero in float64: stays finite so the KL stays finite
    ids, vals, tail, label = store_fields(lp, k=100)
    assert torch.isneginf(tail).all()  # the top-k is the whole vocabulary
    label[0] = -math.inf
    spec = make_spec(100, 100)
    d_ids, d_lp, d_tail, d_label = codec.round_trip(spec, ids, vals, tail, label)
    zero = align(ids, vals, d_ids).double().exp() == 0
    assert zero.sum(-1).eq(25).all()
    assert torch.isneginf(d_lp[zero]).all() and torch.isfinite(d_lp[~zero]).all()
    assert torch.isneginf(d_tail).all() and torch.isneginf(d_label[0])
    check_round_trip(ids, vals, tail, label, (d_ids, d_lp, d_tail, d_label))


def test_a_row_without_mass_and_an_empty_example_decode():
    spec = make_spec(100, 8)
    vals = torch.full((2, 8), -math.inf)
    vals[1] = -1e5
    _, d_lp, d_tail, _ = codec.round_trip(spec, torch.arange(16).view(2, 8), vals, torch.zeros(2), torch.zeros(2))
    assert torch.isneginf(d_lp).all() and torch.equal(d_tail, torch.zeros(2))
    empty = codec.round_trip(
        spec, torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8), torch.zeros(0), torch.zeros(0)
    )
    assert [tuple(t.shape) for t in empty] == [(0, 8), (0, 8), (0,), (0,)]


def test_repeated_ids_in_a_row_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        prepare(
            make_spec(100, 4), torch.tensor([[1, 2, 2, 3]]), torch.full((1, 4), -2.0), torch.zeros(1), torch.zeros(1)
        )


@pytest.mark.parametrize("step", [0.004, codec_v2.DEFAULT_STEP, 0.02])
def test_quantiser_error_bound(step):
    """Every probability decodes within step / 2 in sqrt(p) (log-step region: within 1/2 nat), codes are fixed
    points of their own decoded values, and the table rises with the code."""
    q = codec_v2.Quantiser(step)
    table = q.table()
    assert np.isneginf(table[0]) and (np.diff(table[1:]) > 0).all() and table[-1] == pytest.approx(0.0, abs=1e-6)
    assert (q.encode(table[1:]) == np.arange(1, q.num_codes)).all()
    x = np.linspace(-29.0, 0.0, 200001)
    dec = table[q.encode(x)].astype(np.float64)
    sqrt_region = x >= 2 * math.log(2 * step / codec_v2.LOG_STEP)
    assert np.abs(np.exp(dec / 2) - np.exp(x / 2))[sqrt_region].max() <= step / 2 + 1e-6
    assert np.abs(dec - x)[~sqrt_region].max() <= codec_v2.LOG_STEP / 2 + 1e-6
    assert q.encode(np.array([-700.0, -1e9, -math.inf])).tolist() == [1, 0, 0]  # lowest code; zero mass in float64
