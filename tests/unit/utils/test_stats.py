"""kdpipe.utils.stats against hand-computed cases and printed t tables: the mean's t interval, the t quantile,
the paired difference over seeds, the paired bootstrap over problems, the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdpipe.utils.stats import (
    MIN_SEEDS,
    bootstrap_paired,
    mean_ci,
    paired_difference,
    seed_warning,
    t_quantile,
    verdict,
)


def test_mean_ci_on_a_hand_computed_case():
    # mean 0.7; squared deviations 0.04 + 0.01 + 0 + 0.01 + 0.04 = 0.1, / (n - 1) = 0.025, sd = 0.158114;
    # half-width t(0.975, 4) * sd / sqrt(5) = 2.776445 * 0.0707107 = 0.196324
    ci = mean_ci([0.5, 0.6, 0.7, 0.8, 0.9])
    assert (ci.n, ci.level) == (5, 0.95)
    assert ci.mean == pytest.approx(0.7)
    assert ci.std == pytest.approx(math.sqrt(0.025)) and ci.std == pytest.approx(0.158114, abs=1e-6)
    assert ci.half_width == pytest.approx(0.196324, abs=1e-6)
    assert (ci.low, ci.high) == (pytest.approx(0.503676, abs=1e-6), pytest.approx(0.896324, abs=1e-6))
    assert mean_ci([0.5, 0.6, 0.7, 0.8, 0.9], level=0.99).half_width == pytest.approx(4.604095 * 0.0707107, rel=1e-6)


@pytest.mark.parametrize(
    ("p", "df", "table"),
    [
        (0.975, 1, 12.706205),
        (0.975, 2, 4.302653),
        (0.975, 3, 3.182446),
        (0.975, 4, 2.776445),
        (0.975, 5, 2.570582),
        (0.975, 10, 2.228139),
        (0.975, 30, 2.042272),
        (0.975, 100, 1.983972),
        (0.975, 100_000, 1.959988),  # -> the normal's 1.959964
        (0.95, 2, 2.919986),
        (0.95, 20, 1.724718),
        (0.9, 7, 1.414924),
        (0.99, 15, 2.602480),
        (0.995, 9, 3.249836),
        (0.999, 3, 10.214532),
        (0.9995, 1, 636.619249),
    ],
)
def test_t_quantile_matches_the_printed_tables(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=1e-6, rel=1e-8)
    assert t_quantile(1 - p, df) == pytest.approx(-table, abs=1e-6, rel=1e-8)  # symmetric


def test_t_quantile_edges():
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.75, 1) == pytest.approx(1.0)  # Cauchy: tan(pi / 4)
    for bad in ((0.0, 3), (1.0, 3), (0.9, 0)):
        with pytest.raises(ValueError, match="0 < p < 1"):
            t_quantile(*bad)


def test_fewer_than_two_values_give_no_interval_never_zero():
    one = mean_ci([0.4])
    assert (one.n, one.mean) == (1, 0.4)
    assert one.std is None and one.half_width is None and one.low is None and one.high is None
    empty = mean_ci([])
    assert empty.n == 0 and empty.mean is None and empty.low is None
    single_pair = paired_difference({"seed=1": 0.9, "seed=2": 0.8}, {"seed=1": 0.5})
    assert single_pair.seeds == ("seed=1",) and single_pair.ci.low is None
    assert verdict((single_pair.ci.low, single_pair.ci.high)) == "inconclusive"


def test_paired_difference_on_a_hand_case():
    a = {"1": 0.8, "2": 0.7, "3": 0.9, "4": 0.6}
    b = {"1": 0.7, "2": 0.5, "3": 0.8, "4": 0.6, "5": 0.9}  # seed 5 has no partner: left out
    diff = paired_difference(a, b)
    # differences 0.1, 0.2, 0.1, 0.0: mean 0.1, sd sqrt(0.02 / 3) = 0.0816497, half t(0.975, 3) * sd / 2
    assert diff.seeds == ("1", "2", "3", "4")
    assert diff.differences == pytest.approx((0.1, 0.2, 0.1, 0.0))
    assert diff.ci.mean == pytest.approx(0.1) and diff.ci.std == pytest.approx(0.0816497, abs=1e-7)
    assert diff.ci.half_width == pytest.approx(3.182446 * 0.0816497 / 2, abs=1e-6)
    assert diff.ci.low == pytest.approx(-0.029923, abs=1e-6) and diff.ci.high == pytest.approx(0.229923, abs=1e-6)
    assert verdict((diff.ci.low, diff.ci.high)) == "inconclusive"


def _synthetic(rng, n, p_a, p_b) -> tuple[dict, dict]:
    ids = [f"ex{i}" for i in range(n)]
    a = dict(zip(ids, (rng.random(n) < p_a).astype(float)))
    b = dict(zip(ids, (rng.random(n) < p_b).astype(float)))
    return {"seed=1": a}, {"seed=1": b}


def test_bootstrap_is_deterministic_given_its_seed():
    a, b = _synthetic(np.random.default_rng(1), 300, 0.7, 0.6)
    first, again = bootstrap_paired(a, b, n_boot=2000, seed=3), bootstrap_paired(a, b, n_boot=2000, seed=3)
    assert first == again
    other = bootstrap_paired(a, b, n_boot=2000, seed=4)
    assert (other.low, other.high) != (first.low, first.high)
    observed = np.mean(list(a["seed=1"].values())) - np.mean(list(b["seed=1"].values()))
    assert first.mean == pytest.approx(observed) and first.low < first.mean < first.high
    assert (first.n_problems, first.seeds, first.n_boot, first.seed) == (300, ("seed=1",), 2000, 3)


def test_bootstrap_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for rep in range(200):
        a, b = _synthetic(rng, 200, 0.7, 0.5)  # the true difference in accuracy: 0.2
        boot = bootstrap_paired(a, b, n_boot=1000, seed=rep)
        covered += boot.low <= 0.2 <= boot.high
        assert verdict((boot.low, boot.high)) in ("better", "inconclusive")
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_pairs_problems_by_id_and_averages_over_seeds():
    a = {"s1": {"x": 1.0, "y": 1.0, "z": 0.0}, "s2": {"x": 1.0, "y": 0.0, "z": 1.0}, "s3": {"x": 1.0}}
    b = {"s1": {"x": 0.0, "y": 1.0, "z": 0.0}, "s2": {"x": 0.0, "y": 0.0}}  # s2 lacks z, s3 has no partner
    boot = bootstrap_paired(a, b, n_boot=500)
    assert boot.seeds == ("s1", "s2") and boot.n_problems == 2  # x and y: scored on both sides in every seed
    assert boot.mean == pytest.approx(0.5)  # x: +1 in both seeds, y: 0 in both
    assert 0.0 <= boot.low <= boot.high <= 1.0
    same = bootstrap_paired({"s": {"x": 1.0, "y": 1.0}}, {"s": {"x": 0.0, "y": 0.0}}, n_boot=100)
    assert (same.low, same.high) == (1.0, 1.0)
    none = bootstrap_paired({"s": {"x": 1.0}}, {"s": {"y": 1.0}})
    assert none.n_problems == 0 and none.mean is None and none.low is None


def test_verdict_and_seed_warning():
    assert verdict((0.01, 0.2)) == "better" and verdict((0.01, 0.2), (0.02, 0.1)) == "better"
    assert verdict((-0.2, -0.01)) == "worse"
    assert verdict((-0.1, 0.1)) == "inconclusive" and verdict((0.01, 0.2), (-0.01, 0.1)) == "inconclusive"
    assert verdict((None, None)) == "inconclusive"
    assert seed_warning(3) == "n=3 < 5" and seed_warning(MIN_SEEDS) == ""
