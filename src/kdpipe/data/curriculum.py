"""Curriculum: the order in which a stage sees its examples.

A *schedule* turns per-example difficulty into an order for one pass over the data; a pass is cut into
batches (a fixed number of examples, or a token budget when packing). The stage's whole *plan* is passes
laid end to end until it has ``num_batches`` batches, each pass drawn with its own seed, so the plan is a
pure function of (difficulty, lengths, schedule, seed). :class:`CurriculumBatchSampler` yields the plan
from any position, which is how a resumed stage continues exactly where it stopped.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

from torch.utils.data import Sampler

Order = list[int]


def order_random(difficulty: Sequence[float], rng: random.Random) -> Order:
    """A uniformly random permutation: no curriculum."""
    order = list(range(len(difficulty)))
    rng.shuffle(order)
    return order


def order_sorted(difficulty: Sequence[float], rng: random.Random) -> Order:
    """Easy to hard; ties broken at random so equal-difficulty examples still mix."""
    keys = [(d, rng.random(), i) for i, d in enumerate(difficulty)]
    return [i for _, _, i in sorted(keys)]


def order_buckets(difficulty: Sequence[float], rng: random.Random, num_buckets: int = 5) -> Order:
    """Examples cut into ``num_buckets`` equal-size buckets by difficulty, easy bucket first, shuffled within."""
    if num_buckets < 1:
        raise ValueError(f"curriculum.num_buckets must be >= 1, got {num_buckets}")
    ranked = order_sorted(difficulty, rng)
    order: Order = []
    for b in range(num_buckets):
        bucket = ranked[b * len(ranked) // num_buckets : (b + 1) * len(ranked) // num_buckets]
        rng.shuffle(bucket)
        order.extend(bucket)
    return order


SCHEDULES: dict[str, Callable[..., Order]] = {
    "random": order_random,
    "sorted": order_sorted,
    "buckets": order_buckets,
}


def make_order(schedule: str, difficulty: Sequence[float], rng: random.Random, **kwargs) -> Order:
    """One pass's order under a named schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown curriculum schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[schedule](difficulty, rng, **kwargs)


def cut_batches(
    order: Order, lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Cut an order into consecutive batches: ``batch_size`` examples, or at most ``max_tokens`` tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        full = tokens + lengths[i] > max_tokens if max_tokens is not None else len(current) >= batch_size
        if current and full:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        batches.append(current)
    return batches


class CurriculumBatchSampler(Sampler[list[int]]):
    """Yields the stage's batch plan, from batch ``start`` on.

    Args:
        difficulty: one score per example (higher is harder).
        lengths: tokens per example (used when ``max_tokens`` is set).
        num_batches: batches in the whole plan (the stage's steps times gradient accumulation).
        schedule: a name in :data:`SCHEDULES`; ``schedule_kwargs`` go to it.
        batch_size: examples per batch (ignored when ``max_tokens`` is set).
        max_tokens: token budget per batch, for packing.
        seed: the plan is a pure function of the seed and the inputs.
    """

    def __init__(
        self,
        difficulty: Sequence[float],
        lengths: Sequence[int],
        num_batches: int,
        schedule: str = "random",
        batch_size: int = 32,
        max_tokens: int | None = None,
        seed: int = 0,
        schedule_kwargs: dict | None = None,
    ) -> None:
        if len(difficulty) != len(lengths) or not difficulty:
            raise ValueError("curriculum needs one difficulty and one length per example, and some examples")
        if max_tokens is not None and max(lengths) > max_tokens:
            raise ValueError(f"an example of {max(lengths)} tokens does not fit max_tokens={max_tokens}")
        self.difficulty, self.lengths = list(difficulty), list(lengths)
        self.num_batches, self.schedule, self.batch_size = num_batches, schedule, batch_size
        self.max_tokens, self.seed, self.schedule_kwargs = max_tokens, seed, dict(schedule_kwargs or {})
        self.start = 0
        self._plan: list[list[int]] | None = None

    def pass_batches(self, pass_index: int) -> list[list[int]]:
        """The batches of one pass over the data."""
        rng = random.Random(f"curriculum:{self.seed}:{pass_index}")
        order = make_order(self.schedule, self.difficulty, rng, **self.schedule_kwargs)
        return cut_batches(order, self.lengths, self.batch_size, self.max_tokens)

    @property
    def plan(self) -> list[list[int]]:
        """Every batch of the stage, in order."""
        if self._plan is None:
            plan: list[list[int]] = []
            pass_index = 0
            while len(plan) < self.num_batches:
                plan.extend(self.pass_batches(pass_index))
                pass_index += 1
            self._plan = plan[: self.num_batches]
        return self._plan

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.plan[self.start :]

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)
