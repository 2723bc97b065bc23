"""Curriculum: the order in which a stage sees its examples.

A *schedule* turns per-example difficulty into an order for one pass over the data; a pass is cut into
batches (a fixed number of examples, or a token budget when packing). The stage's whole *plan* is passes
laid end to end until it has ``num_batches`` batches, each pass drawn with its own seed, so the plan is a
pure function of (difficulty, lengths, schedule, seed). :class:`CurriculumBatchSampler` yields the plan
from any position, which is how a resumed stage continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence

from torch.utils.data import Sampler

from kdpipe.types import IGNORE_INDEX

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


def order_reverse(difficulty: Sequence[float], rng: random.Random) -> Order:
    """Hard to easy (anti-curriculum); ties broken at random."""
    return order_sorted([-d for d in difficulty], rng)


def order_baby_steps(difficulty: Sequence[float], rng: random.Random, num_buckets: int = 5) -> Order:
    """Baby steps (Spitkovsky et al., 2010): phase b trains on buckets 1..b together, shuffled, so every
    bucket is added to what came before instead of replacing it. One pass is all ``num_buckets`` phases."""
    if num_buckets < 1:
        raise ValueError(f"curriculum.num_buckets must be >= 1, got {num_buckets}")
    ranked = order_sorted(difficulty, rng)
    order: Order = []
    for b in range(1, num_buckets + 1):
        seen = ranked[: b * len(ranked) // num_buckets]
        phase = list(seen)
        rng.shuffle(phase)
        order.extend(phase)
    return order


SCHEDULES: dict[str, Callable[..., Order]] = {
    "random": order_random,
    "sorted": order_sorted,
    "reverse": order_reverse,
    "buckets": order_buckets,
    "baby_steps": order_baby_steps,
}
PACED = ("competence",)  # schedules that pick each batch by step, not by passes


def competence(step: int, total_steps: int, c0: float = 0.01) -> float:
    """Platanios et al. (2019), square-root competence: c(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2))."""
    if not 0.0 < c0 <= 1.0:
        raise ValueError(f"curriculum.c0 must be in (0, 1], got {c0}")
    return min(1.0, (step * (1.0 - c0**2) / max(total_steps, 1) + c0**2) ** 0.5)


def competence_plan(
    difficulty: Sequence[float],
    num_batches: int,
    batch_size: int,
    rng: random.Random,
    c0: float = 0.01,
    competence_steps: int | None = None,
) -> list[list[int]]:
    """Batch t is drawn uniformly (without replacement within the batch) from the easiest c(t) share of the
    examples; c reaches 1 at ``competence_steps`` (default: the whole plan), after which all data is used."""
    ranked = order_sorted(difficulty, rng)
    total = competence_steps or num_batches
    plan = []
    for t in range(num_batches):
        available = max(min(batch_size, len(ranked)), round(competence(t, total, c0) * len(ranked)))
        plan.append(rng.sample(ranked[:available], min(batch_size, available)))
    return plan


def make_order(schedule: str, difficulty: Sequence[float], rng: random.Random, **kwargs) -> Order:
    """One pass's order under a named schedule."""
    if schedule not in SCHEDULES:
        choices = sorted([*SCHEDULES, *PACED])
        raise ValueError(f"unknown curriculum schedule {schedule!r}; choose one of {choices}")
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


def rank_rows(batch: list[int], rank: int, num_replicas: int, dataset_size: int) -> list[int]:
    """This rank's rows of a global batch: rows ``rank, rank + W, ...``, so the ranks' parts are disjoint and
    together are the global batch (the one a single process gets with ``W`` times the per-rank batch size).

    A global batch with fewer rows than ranks (the short last batch of a pass) leaves some ranks nothing: they
    get a *placeholder*, index ``dataset_size + batch[0]``, which :class:`WithPlaceholders` serves as that
    example with every label masked. The rank runs forward and backward, as DDP requires of every rank, and
    adds nothing to the loss (the modules normalise by the global label count)."""
    rows = batch[rank::num_replicas]
    return rows if rows else [dataset_size + batch[0]]


def placeholder(example):
    """``example`` with every label masked: it runs through the model and adds nothing to any loss."""
    return dataclasses.replace(example, labels=[IGNORE_INDEX] * len(example.labels))


def rank_share_of(rows: Sequence, rank: int, num_replicas: int) -> list:
    """Rows ``rank::num_replicas``, topped up with placeholders so that every rank has as many rows (and so
    runs as many batches: under FSDP each forward is a collective); used for validation."""
    mine = list(rows[rank::num_replicas])
    return mine + [placeholder(rows[0])] * (-(-len(rows) // num_replicas) - len(mine))


class WithPlaceholders(Sequence):
    """A dataset of encoded examples that also serves :func:`rank_rows`' placeholders: index ``len + i`` is
    example ``i`` with no label tokens."""

    def __init__(self, examples: Sequence) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        if 0 <= index < len(self.examples):
            return self.examples[index]
        if len(self.examples) <= index < 2 * len(self.examples):
            return placeholder(self.examples[index - len(self.examples)])
        raise IndexError(f"index {index} is outside the dataset and its placeholders")


class CurriculumBatchSampler(Sampler[list[int]]):
    """Yields the stage's batch plan, from batch ``start`` on.

    ``len()`` is always the whole plan: a Lightning run resumed mid-epoch restores how many batches it
    has already seen and ends the epoch when that count reaches ``len()``, so skipping the consumed batches
    here (``start``) and counting them there must add up to the same plan.

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
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(difficulty) != len(lengths) or not difficulty:
            raise ValueError("curriculum needs one difficulty and one length per example, and some examples")
        if max_tokens is not None and max(lengths) > max_tokens:
            raise ValueError(f"an example of {max(lengths)} tokens does not fit max_tokens={max_tokens}")
        self.difficulty, self.lengths = list(difficulty), list(lengths)
        self.num_batches, self.schedule, self.batch_size = num_batches, schedule, batch_size
        self.max_tokens, self.seed, self.schedule_kwargs = max_tokens, seed, dict(schedule_kwargs or {})
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_replicas, self.rank = num_replicas, rank
        self.start = 0
        self._plan: list[list[int]] | None = None

    def pass_batches(self, pass_index: int) -> list[list[int]]:
        """The global batches of one pass over the data (``batch_size`` per rank)."""
        rng = random.Random(f"curriculum:{self.seed}:{pass_index}")
        order = make_order(self.schedule, self.difficulty, rng, **self.schedule_kwargs)
        max_tokens = self.max_tokens * self.num_replicas if self.max_tokens is not None else None
        return cut_batches(order, self.lengths, self.batch_size * self.num_replicas, max_tokens)

    @property
    def global_plan(self) -> list[list[int]]:
        """Every global batch of the stage, in order (the same on every rank)."""
        if self._plan is None:
            if self.schedule in PACED:
                rng = random.Random(f"curriculum:{self.seed}:paced")
                batch = self.batch_size * self.num_replicas
                self._plan = competence_plan(self.difficulty, self.num_batches, batch, rng, **self.schedule_kwargs)
                return self._plan
            plan: list[list[int]] = []
            pass_index = 0
            while len(plan) < self.num_batches:
                plan.extend(self.pass_batches(pass_index))
                pass_index += 1
            self._plan = plan[: self.num_batches]
        return self._plan

    @property
    def plan(self) -> list[list[int]]:
        """This rank's batches: its rows of each global batch (:func:`rank_rows`)."""
        if self.num_replicas == 1:
            return self.global_plan
        return [rank_rows(batch, self.rank, self.num_replicas, len(self.difficulty)) for batch in self.global_plan]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.plan[self.start :]

    def __len__(self) -> int:
        return self.num_batches  # the whole plan, also when resuming from ``start`` (see the class docstring)


def _stream(pool: CurriculumBatchSampler) -> Iterator[int]:
    """A pool's plan read as one endless stream of examples: the stage's plan, then further passes."""
    yield from (i for batch in pool.global_plan for i in batch)
    pass_index = 0
    while True:  # the plan's last batch of a pass may be short, so a stream can need a little more
        if pool.schedule in PACED:
            yield from (i for batch in pool.global_plan for i in batch)
        else:
            yield from (i for batch in pool.pass_batches(10_000 + pass_index) for i in batch)
        pass_index += 1


class MixedBatchSampler(Sampler[list[int]]):
    """Batches that mix two pools in a fixed proportion: ``ratio`` of every global batch from ``secondary``.

    Used by KD stages that train on label-conditioned (``primary``) and on-policy (``secondary``) sequences
    at once (the paper's lambda). Each pool keeps its own curriculum plan (read as one stream of examples);
    batch t takes ``round((t + 1) r B) - round(t r B)`` examples from the secondary stream and the rest from
    the primary, so every prefix of the plan holds the requested share up to one example. Secondary indices
    are offset by ``offset`` (the primary pool's size: the two pools are concatenated in one dataset).
    Rows are shuffled within a batch (seeded), then sliced per rank as in :class:`CurriculumBatchSampler`.
    """

    def __init__(
        self,
        primary: CurriculumBatchSampler,
        secondary: CurriculumBatchSampler,
        ratio: float,
        offset: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"on-policy ratio (lambda) must be in [0, 1], got {ratio}")
        if primary.max_tokens is not None or secondary.max_tokens is not None:
            raise ValueError("mixing label and on-policy sequences needs fixed-size batches (data.packing=false)")
        if primary.num_replicas != 1 or secondary.num_replicas != 1:
            raise ValueError("the pools' samplers must be global (num_replicas=1); the mix is sliced per rank")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.primary, self.secondary, self.ratio, self.offset = primary, secondary, ratio, offset
        self.num_batches, self.batch_size = primary.num_batches, primary.batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.start = 0
        self._plan: list[list[int]] | None = None

    def secondary_count(self, t: int) -> int:
        """Examples batch ``t`` takes from the secondary pool."""
        total = self.batch_size
        return round((t + 1) * self.ratio * total) - round(t * self.ratio * total)

    @property
    def global_plan(self) -> list[list[int]]:
        if self._plan is None:
            first, second = _stream(self.primary), _stream(self.secondary)
            rng = random.Random(f"mixed:{self.primary.seed}")
            plan = []
            for t in range(self.num_batches):
                n = self.secondary_count(t)
                batch = [next(first) for _ in range(self.batch_size - n)]
                batch += [self.offset + next(second) for _ in range(n)]
                rng.shuffle(batch)
                plan.append(batch)
            self._plan = plan
        return self._plan

    @property
    def plan(self) -> list[list[int]]:
        """This rank's batches: its rows of each global batch (:func:`rank_rows`)."""
        if self.num_replicas == 1:
            return self.global_plan
        size = self.offset + len(self.secondary.difficulty)  # the two pools, concatenated
        return [rank_rows(batch, self.rank, self.num_replicas, size) for batch in self.global_plan]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.plan[self.start :]

    def __len__(self) -> int:
        return self.num_batches
