"""Several ranks, one plan: every rank's batches are its part of the one-process global batches (placeholder rows
where a global batch has too few examples), validation rows split evenly, and a placeholder row reads no
teacher rows. (The multi-process runs that rely on this: tests/integration/test_distributed.py.)"""

from __future__ import annotations

import pytest
import torch

from kdpipe.data.collate import Collator, KDCollator
from kdpipe.data.curriculum import CurriculumBatchSampler, MixedBatchSampler, WithPlaceholders, rank_share_of
from kdpipe.store.reader import TeacherRows
from kdpipe.types import EncodedExample


def _examples(n: int) -> list[EncodedExample]:
    return [EncodedExample(f"e{i}", [1, 2, 3, 4 + i % 5], [-100, 2, 3, 4], level=i % 3) for i in range(n)]


def test_two_ranks_split_every_global_batch_of_the_one_process_plan():
    n = 25
    one = CurriculumBatchSampler([0.0] * n, [4] * n, num_batches=8, batch_size=4, seed=3)
    difficulty, lengths = [0.0] * n, [4] * n
    ranks = [
        CurriculumBatchSampler(difficulty, lengths, 8, batch_size=2, seed=3, num_replicas=2, rank=r) for r in (0, 1)
    ]
    assert ranks[0].global_plan == ranks[1].global_plan == one.global_plan
    assert [len(b) for b in one.global_plan] == [4, 4, 4, 4, 4, 4, 1, 4]  # a pass of 25 ends with one example
    for t, batch in enumerate(one.global_plan):
        mine, theirs = ranks[0].plan[t], ranks[1].plan[t]
        real = [i for i in mine + theirs if i < n]
        assert sorted(real) == sorted(batch) and len(set(real)) == len(real)
        if len(batch) == 1:  # rank 1 has no row: a placeholder of the batch's example
            assert mine == batch and theirs == [n + batch[0]]
    dataset = WithPlaceholders(_examples(n))
    ghost = dataset[n + 6]
    assert ghost.input_ids == dataset[6].input_ids and ghost.num_label_tokens == 0 and ghost.id == "e6"
    with pytest.raises(IndexError):
        dataset[2 * n]


def test_mixed_batches_split_the_same_way():
    pool = [CurriculumBatchSampler([0.0] * m, [4] * m, 5, batch_size=6, seed=1) for m in (20, 7)]
    one = MixedBatchSampler(*pool, ratio=0.5, offset=20)
    ranks = [MixedBatchSampler(*pool, ratio=0.5, offset=20, num_replicas=2, rank=r) for r in (0, 1)]
    for t, batch in enumerate(one.global_plan):
        assert sorted(ranks[0].plan[t] + ranks[1].plan[t]) == sorted(batch)


def test_validation_rows_are_split_evenly_with_placeholders():
    rows = _examples(5)
    shares = [rank_share_of(rows, r, 2) for r in (0, 1)]
    assert [len(s) for s in shares] == [3, 3]
    assert [e.id for e in shares[0]] == ["e0", "e2", "e4"] and [e.id for e in shares[1][:2]] == ["e1", "e3"]
    assert shares[1][2].num_label_tokens == 0
    assert [len(rank_share_of(rows[:1], r, 2)) for r in (0, 1)] == [1, 1]  # every rank validates something


def test_kd_collator_asks_the_store_nothing_for_a_placeholder_row():
    asked: list[list[str]] = []

    class Store:
        k = 2

        def get_many(self, ids):
            asked.append(list(ids))
            n = 3 * len(ids)
            rows = TeacherRows(torch.ones(n, 2, dtype=torch.long), torch.zeros(n, 2), torch.zeros(n), torch.zeros(n))
            return rows, [3] * len(ids)

    examples = WithPlaceholders(_examples(2))
    collate = KDCollator(Collator(0), Store())
    batch = collate([examples[0], examples[3]])  # example 0 and a placeholder of example 1
    assert asked == [["e0"]]
    assert batch["has_teacher"][0].sum() == 3 and batch["has_teacher"][1].sum() == 0
    alone = collate([examples[2]])  # a rank whose only row is a placeholder
    assert asked == [["e0"]] and alone["has_teacher"].sum() == 0
