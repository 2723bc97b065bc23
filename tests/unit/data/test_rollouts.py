"""On-policy data: the rollout-set format (filters, incomplete sets), mixing label and on-policy pools, nested
training subsets and their complements, prompts with their labels withheld, store unions. Sampling a rollout
set is kdpipe.engines.rollouts (tests/unit/engines)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from kdpipe.data.arith import generate_split
from kdpipe.data.curriculum import CurriculumBatchSampler, MixedBatchSampler, _stream
from kdpipe.data.rollouts import (
    MANIFEST,
    apply_filters,
    arith_answer,
    load_rollouts,
    part_path,
    task_answer,
    withhold_labels,
)
from kdpipe.data.sources import outside_subset_by_id, subset_by_id
from tests.helpers import encoded, write_store


def test_filters_and_incomplete_sets(tmp_path):
    records = [
        {"id": "a#s0", "finished": True, "correct": True},
        {"id": "a#s1", "finished": False, "correct": False},
        {"id": "b#s0", "finished": True, "correct": False},
        {"id": "c#s0", "finished": True, "correct": None},  # a task that cannot check answers
    ]
    assert [r["id"] for r in apply_filters(records, True, False)] == ["a#s0", "b#s0", "c#s0"]
    assert [r["id"] for r in apply_filters(records, True, True)] == ["a#s0", "c#s0"]
    assert len(apply_filters(records, False, False)) == 4
    part_path(tmp_path, 0).write_text('{"id": "a#s0"}\n')
    with pytest.raises(FileNotFoundError, match=f"no {MANIFEST}"):
        load_rollouts(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"parts": 1, "settings": {"drop_truncated": 0, "only_correct": 0}}))
    part_path(tmp_path, 0).write_text('{"id": "a#s0", "finished": true, "correct": null}\nnot json\n')
    with pytest.raises(ValueError, match=r"part-00000\.jsonl, line 2"):
        load_rollouts(tmp_path)


def _pool(n: int, batch: int, num_batches: int, seed: int = 0) -> CurriculumBatchSampler:
    return CurriculumBatchSampler([float(i % 5) for i in range(n)], [10] * n, num_batches, "sorted", batch, seed=seed)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_lambda_mixing_gives_the_requested_share_in_every_prefix(ratio):
    labels, onpolicy, batch, steps = 50, 30, 8, 40
    mixed = MixedBatchSampler(_pool(labels, batch, steps), _pool(onpolicy, batch, steps), ratio, offset=labels)
    plan = list(mixed)
    assert len(plan) == len(mixed) == steps and all(len(b) == batch for b in plan)
    taken = 0
    for t, b in enumerate(plan, 1):
        taken += sum(i >= labels for i in b)
        assert abs(taken - ratio * batch * t) <= 1  # the share holds at every step, up to one example
    assert taken == round(ratio * batch * steps)
    assert all(0 <= i < labels + onpolicy for b in plan for i in b)
    # each pool is read in its own curriculum order (sorted: easy first); rows are shuffled within a batch
    stream = list(itertools.islice(_stream(_pool(onpolicy, batch, steps)), batch * steps))
    used = 0
    for b in plan:
        mine = sorted(i - labels for i in b if i >= labels)
        assert mine == sorted(stream[used : used + len(mine)])
        used += len(mine)


def test_mixed_batches_split_across_ranks_disjoint_and_covering():
    full = MixedBatchSampler(_pool(50, 8, 10), _pool(30, 8, 10), 0.5, offset=50)
    parts = [MixedBatchSampler(_pool(50, 8, 10), _pool(30, 8, 10), 0.5, 50, num_replicas=2, rank=r) for r in (0, 1)]
    for t, global_batch in enumerate(full.global_plan):
        a, b = parts[0].plan[t], parts[1].plan[t]
        assert sorted(a + b) == sorted(global_batch) and len(a) == len(b) == 4
    with pytest.raises(ValueError, match=r"lambda\) must be in \[0, 1\]"):
        MixedBatchSampler(_pool(5, 2, 2), _pool(5, 2, 2), 1.5, offset=5)


def test_train_fraction_subsets_are_nested_and_about_the_right_size():
    examples = generate_split("train", 200, seed=0)
    small, large = subset_by_id(examples, 0.1), subset_by_id(examples, 0.5)
    assert {e["id"] for e in small} <= {e["id"] for e in large}
    assert abs(len(small) / len(examples) - 0.1) < 0.03 and abs(len(large) / len(examples) - 0.5) < 0.05
    assert subset_by_id(examples, 1.0) == examples
    with pytest.raises(ValueError, match="train_fraction"):
        subset_by_id(examples, 0.0)


def test_exclude_fraction_is_the_exact_complement_of_the_train_fraction_subset():
    examples = generate_split("train", 100, seed=0)
    for fraction in (0.0, 0.05, 0.5):
        inside = subset_by_id(examples, fraction) if fraction else []
        outside = outside_subset_by_id(examples, fraction)
        assert {e["id"] for e in inside}.isdisjoint(e["id"] for e in outside)
        assert len(inside) + len(outside) == len(examples)
        assert [e for e in examples if e in outside] == outside  # in the split's order
    with pytest.raises(ValueError, match="exclude_fraction"):
        outside_subset_by_id(examples, 1.0)


def test_withheld_prompts_keep_no_label_and_the_built_in_task_still_checks_them():
    examples = generate_split("train", 20, seed=0)
    withheld = withhold_labels(examples)
    assert all(set(w) == {"id", "prompt", "level"} for w in withheld)
    assert [w["id"] for w in withheld] == [e["id"] for e in examples] and "answer" in examples[0]  # a copy
    assert [arith_answer(w) for w in withheld] == [e["answer"] for e in examples]  # solved from the prompt
    assert task_answer({"source": "arith"}) is arith_answer and task_answer({"source": "jsonl"}) is None
    assert arith_answer({"prompt": "What is 2+2?"}) is None
    chat = {"id": "c", "answer": "36", "messages": [{"role": "user", "content": "12*3?"},
                                                    {"role": "assistant", "content": "36"}]}  # fmt: skip
    assert withhold_labels([chat]) == [{"id": "c", "messages": [{"role": "user", "content": "12*3?"}]}]


def test_store_union_reads_each_id_from_its_store_and_refuses_mixed_signals(tokenizer, tmp_path):
    from kdpipe.store.reader import StoreError, StoreUnion, TeacherStore

    examples = encoded(tokenizer)
    write_store(tmp_path / "a", tokenizer, examples[:6])
    write_store(tmp_path / "b", tokenizer, examples[6:])
    a, b = TeacherStore(tmp_path / "a"), TeacherStore(tmp_path / "b")
    union = StoreUnion([a, b])
    ids = [examples[7].id, examples[0].id, examples[9].id]
    rows, counts = union.get_many(ids)
    expected = [b.get(ids[0]), a.get(ids[1]), b.get(ids[2])]
    assert counts == [len(e.topk_ids) for e in expected]
    torch.testing.assert_close(rows.topk_logprobs, torch.cat([e.topk_logprobs for e in expected]))
    with pytest.raises(StoreError, match="no teacher store"):
        union.get("missing")

    class OtherK:  # another k: the rows would not stack into one batch
        spec, k, path, temperature = dataclasses.replace(a.spec, k=3), 3, tmp_path / "other", a.temperature

    with pytest.raises(StoreError, match="hold different signals"):
        StoreUnion([a, OtherK()])

    class OtherT:  # another temperature: the same bins would mean different distributions
        spec, k, path, temperature = a.spec, a.k, tmp_path / "hot", 2.0

    with pytest.raises(StoreError, match="different temperatures"):
        StoreUnion([a, OtherT()])
