"""Each schedule's ordering property, batching, determinism and resuming from a position."""

from __future__ import annotations

import itertools
import random

import pytest

from kdpipe.data.curriculum import CurriculumBatchSampler, cut_batches, make_order

DIFFICULTY = [random.Random(0).randint(1, 5) for _ in range(100)]
LENGTHS = [random.Random(1).randint(5, 40) for _ in range(100)]


def test_random_is_a_permutation_and_seeded():
    a = make_order("random", DIFFICULTY, random.Random(1))
    assert sorted(a) == list(range(100))
    assert a == make_order("random", DIFFICULTY, random.Random(1))
    assert a != make_order("random", DIFFICULTY, random.Random(2))


def test_sorted_is_monotone_easy_to_hard():
    order = make_order("sorted", DIFFICULTY, random.Random(0))
    assert sorted(order) == list(range(100))
    ranks = [DIFFICULTY[i] for i in order]
    assert ranks == sorted(ranks)


@pytest.mark.parametrize("num_buckets", [1, 3, 5])
def test_buckets_are_contiguous_in_difficulty_and_shuffled_within(num_buckets):
    order = make_order("buckets", DIFFICULTY, random.Random(0), num_buckets=num_buckets)
    assert sorted(order) == list(range(100))
    size = 100 // num_buckets
    buckets = [order[b * 100 // num_buckets : (b + 1) * 100 // num_buckets] for b in range(num_buckets)]
    for easy, hard in itertools.pairwise(buckets):
        assert max(DIFFICULTY[i] for i in easy) <= min(DIFFICULTY[i] for i in hard)
    if size > 10:  # within a bucket the order is not the sorted one
        ranks = [DIFFICULTY[i] for i in buckets[0]]
        assert ranks != sorted(ranks) or len(set(ranks)) == 1


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown curriculum schedule 'sortd'"):
        make_order("sortd", DIFFICULTY, random.Random(0))


def test_cut_batches_by_count_and_by_token_budget():
    order = list(range(10))
    assert cut_batches(order, [1] * 10, batch_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batches = cut_batches(list(range(100)), LENGTHS, batch_size=0, max_tokens=64)
    assert [i for b in batches for i in b] == list(range(100))
    assert all(sum(LENGTHS[i] for i in b) <= 64 for b in batches)


def test_sampler_plan_spans_passes_and_resumes_from_any_position():
    sampler = CurriculumBatchSampler(DIFFICULTY, LENGTHS, num_batches=30, schedule="sorted", batch_size=8, seed=5)
    plan = list(sampler)
    assert len(plan) == len(sampler) == 30
    # the first pass is easy to hard; passes are drawn anew with their own seed
    first_pass = [DIFFICULTY[i] for b in plan[:12] for i in b]
    assert first_pass == sorted(first_pass)
    assert plan[13:26] != plan[:13]
    again = CurriculumBatchSampler(DIFFICULTY, LENGTHS, num_batches=30, schedule="sorted", batch_size=8, seed=5)
    again.start = 17
    assert list(again) == plan[17:] and len(again) == 13
