"""Each schedule's ordering property, batching, determinism and resuming from a position."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kdpipe.data.curriculum import CurriculumBatchSampler, cut_batches, make_order
from tests.helpers import encoded, tiny_lm, write_store

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
    assert list(again) == plan[17:] and len(again) == 30  # len: the plan, as Lightning counts it


def test_reverse_is_monotone_hard_to_easy():
    order = make_order("reverse", DIFFICULTY, random.Random(0))
    ranks = [DIFFICULTY[i] for i in order]
    assert sorted(order) == list(range(100)) and ranks == sorted(ranks, reverse=True)


def test_baby_steps_are_cumulative():
    order = make_order("baby_steps", DIFFICULTY, random.Random(0), num_buckets=4)
    ranked = make_order("sorted", DIFFICULTY, random.Random(0))
    phases, start = [], 0
    for b in range(1, 5):
        size = b * 100 // 4
        phases.append(order[start : start + size])
        start += size
    assert start == len(order)
    for before, after in itertools.pairwise(phases):
        assert set(before) < set(after)  # each phase keeps every example of the one before and adds more
    assert set(phases[-1]) == set(range(100))
    # phase 1 holds the easiest quarter
    assert max(DIFFICULTY[i] for i in phases[0]) <= min(DIFFICULTY[i] for i in ranked[25:])


def test_competence_grows_monotonically_and_reaches_the_full_set_at_T():
    from kdpipe.data.curriculum import competence

    values = [competence(t, 50, c0=0.1) for t in range(80)]
    assert values[0] == pytest.approx(0.1)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[50] == 1.0 and values[49] < 1.0 and values[-1] == 1.0
    sampler = CurriculumBatchSampler(
        DIFFICULTY,
        LENGTHS,
        num_batches=60,
        schedule="competence",
        batch_size=8,
        seed=1,
        schedule_kwargs={"c0": 0.1, "competence_steps": 40},
    )
    plan = list(sampler)
    ranked_difficulty = sorted(DIFFICULTY)
    for t, batch in enumerate(plan):
        limit = max(8, round(competence(t, 40, 0.1) * 100))
        assert max(DIFFICULTY[i] for i in batch) <= ranked_difficulty[limit - 1]  # only the easiest c(t)
        assert len(set(batch)) == len(batch) == 8
    assert max(DIFFICULTY[i] for b in plan[40:] for i in b) == max(DIFFICULTY)  # the whole set once c = 1


@pytest.mark.parametrize("schedule", ["random", "sorted", "buckets", "baby_steps", "competence"])
def test_two_ranks_get_disjoint_parts_that_cover_the_global_order(schedule):
    kwargs = dict(num_batches=12, schedule=schedule, batch_size=4, seed=3)
    single = CurriculumBatchSampler(DIFFICULTY, LENGTHS, num_replicas=2, rank=0, **kwargs)
    ranks = [CurriculumBatchSampler(DIFFICULTY, LENGTHS, num_replicas=2, rank=r, **kwargs) for r in (0, 1)]
    for step, global_batch in enumerate(single.global_plan):
        parts = [list(r)[step] for r in ranks]
        # disjoint by position in the global batch, covering it; by example too, except that a baby-steps batch
        # spanning two phases may hold an example twice (once per phase)
        assert sorted(parts[0] + parts[1]) == sorted(global_batch)
        if schedule != "baby_steps":
            assert not set(parts[0]) & set(parts[1])
        assert len(parts[0]) == len(parts[1]) == 4
    with pytest.raises(ValueError, match="rank 2"):
        CurriculumBatchSampler(DIFFICULTY, LENGTHS, num_replicas=2, rank=2, **kwargs)


def test_teacher_scorers_read_the_store_and_cache_per_scorer(tokenizer, tmp_path):
    from kdpipe.data.scorers import example_scores
    from kdpipe.store.reader import TeacherStore

    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    store = TeacherStore(tmp_path / "store")
    nll = example_scores(examples, {"scorer": "teacher_nll"}, store)
    for i, e in enumerate(examples):  # the plain reference: the decoded label log-probs, averaged
        assert nll[i] == pytest.approx(float(-store.get(e.id).label_logprob.double().mean()))
    assert (tmp_path / "store" / "scores" / "teacher_nll.json").exists()
    entropy = example_scores(examples, {"scorer": "teacher_entropy"}, store)
    got = store.get(examples[0].id)
    p = torch.cat([got.topk_logprobs.double().exp(), got.tail_logprob.double().exp()[:, None]], -1)
    assert entropy[0] == pytest.approx(float(-(torch.xlogy(p, p).sum(-1)).mean()))
    assert all(v > 0 for v in entropy)
    with pytest.raises(ValueError, match="reads the teacher store"):
        example_scores(examples, {"scorer": "teacher_nll"}, None)


def test_composite_averages_normalised_ranks(tokenizer):
    from kdpipe.data.scorers import example_scores

    examples = encoded(tokenizer)
    level = example_scores(examples, {"scorer": "level"})
    length = example_scores(examples, {"scorer": "length"})
    mixed = example_scores(examples, {"scorer": {"name": "composite", "components": {"level": 1.0, "length": 1.0}}})
    only_level = example_scores(examples, {"scorer": {"name": "composite", "components": {"level": 1.0}}})
    assert all(0.0 <= v <= 1.0 for v in mixed)
    # with one component the composite orders exactly as that scorer does
    assert sorted(range(len(level)), key=lambda i: (level[i], i)) == sorted(
        range(len(level)), key=lambda i: (only_level[i], i)
    )
    # dominance: an example at least as hard on every component is at least as hard overall
    for a in range(len(mixed)):
        for b in range(len(mixed)):
            if level[a] >= level[b] and length[a] >= length[b]:
                assert mixed[a] >= mixed[b] - 1e-12
    with pytest.raises(ValueError, match=r"unknown curriculum\.scorer"):
        example_scores(examples, {"scorer": "perplexity"})
    with pytest.raises(ValueError, match="components"):
        example_scores(examples, {"scorer": {"name": "composite", "components": {}}})
    with pytest.raises(ValueError, match="needs a `name`"):
        example_scores(examples, {"scorer": {"components": {"level": 1.0}}})


def test_student_loss_matches_a_per_example_float64_reference_and_is_cached(tokenizer, tmp_path):
    from kdpipe.data.collate import Collator
    from kdpipe.data.scorers import example_scores

    examples = encoded(tokenizer)
    model = tiny_lm(tokenizer)
    cfg = {"scorer": {"name": "student_loss", "batch_size": 3}}  # batches mix lengths: padding must not leak
    collate = Collator(tokenizer.pad_token_id)
    scores = example_scores(examples, cfg, model=model, collate=collate, cache_dir=tmp_path / "scores")
    with torch.no_grad():
        for e, got in zip(examples, scores):  # reference: each example alone, no padding, float64 softmax
            logits = model(torch.tensor([e.input_ids])).logits[0].double()
            labels = torch.tensor(e.labels)
            mask = labels != -100
            nll = -logits.log_softmax(-1)[mask].gather(-1, labels[mask][:, None]).squeeze(-1)
            assert got == pytest.approx(float(nll.mean()), rel=1e-5)
    # resume: the stage-start scores come back from the cache even though the model has moved on
    moved = tiny_lm(tokenizer, seed=1)
    again = example_scores(examples, cfg, model=moved, collate=collate, cache_dir=tmp_path / "scores")
    assert again == scores
    assert example_scores(examples, cfg, cache_dir=tmp_path / "scores") == scores  # no model needed then
    fresh = example_scores(examples, cfg, model=moved, collate=collate, cache_dir=tmp_path / "other")
    assert fresh != scores
    with pytest.raises(ValueError, match="runs the current model"):
        example_scores(examples, cfg, cache_dir=tmp_path / "empty")
    assert model.training is False and moved.training is False  # the scoring pass restores the mode


def test_composite_can_mix_student_loss_with_a_given_level(tokenizer, tmp_path):
    from kdpipe.data.collate import Collator
    from kdpipe.data.scorers import example_scores, needs_model, needs_store

    examples = encoded(tokenizer)
    cfg = {"scorer": {"name": "composite", "components": {"level": 2.0, "student_loss": 1.0}}}
    assert needs_model(cfg) and not needs_store(cfg)
    scores = example_scores(
        examples, cfg, model=tiny_lm(tokenizer), collate=Collator(tokenizer.pad_token_id), cache_dir=tmp_path
    )
    assert all(0.0 <= v <= 1.0 for v in scores)
    assert (tmp_path / "student_loss.json").exists()
