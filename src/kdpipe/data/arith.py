"""The built-in task ``arith``: multi-step integer arithmetic, generated deterministically from a seed.

Every example is a plain dict (the same shape the data loaders produce for user data)::

    {"id": "arith-L4-3f2a9c1b0d", "level": 4, "prompt": "7+3*6", "answer": "25",
     "responses": {"reasoning": "3*6=18\\n7+18=25\\nAnswer: 25", "fast": "Answer: 25"}}

Difficulty grows with the level: more operands, more digits, more operator kinds. Multiplication binds
tighter than addition and subtraction, so higher levels need an ordering of steps, which the ``reasoning``
response spells out one equation per line. Every intermediate result stays in ``[0, max_value]``.

Splits never share a problem: the split of a problem is a pure function of its expression (a hash), so
generating more examples for one split can never pull a problem into another.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

SPLITS = ("train", "val", "test")
STYLES = ("reasoning", "fast")
# share of the problem space (by hash) that each split draws from
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class LevelSpec:
    """How problems of one difficulty level are drawn."""

    n_operands: int
    max_operand: int  # operands of + and - are drawn from [0, max_operand]
    ops: str  # operator kinds allowed
    max_factor: int = 9  # both operands of * are drawn from [0, max_factor]


# level -> spec; level 1 is the easiest
LEVELS: dict[int, LevelSpec] = {
    1: LevelSpec(n_operands=2, max_operand=9, ops="+"),
    2: LevelSpec(n_operands=2, max_operand=30, ops="+-"),
    3: LevelSpec(n_operands=3, max_operand=30, ops="+-"),
    4: LevelSpec(n_operands=3, max_operand=30, ops="+-*"),
    5: LevelSpec(n_operands=4, max_operand=30, ops="+-*"),
}


def split_of(expression: str) -> str:
    """The split a problem belongs to, fixed by a hash of its expression."""
    bucket = int(hashlib.sha1(expression.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for split in SPLITS:
        edge += SPLIT_FRACTIONS[split]
        if bucket < edge:
            return split
    return SPLITS[-1]


def solve(operands: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Evaluate with the usual precedence; return the value and one equation per step."""
    values, pending, steps = list(operands), list(ops), []
    # multiplications first, left to right
    i = 0
    while i < len(pending):
        if pending[i] == "*":
            result = values[i] * values[i + 1]
            steps.append(f"{values[i]}*{values[i + 1]}={result}")
            values[i : i + 2] = [result]
            del pending[i]
        else:
            i += 1
    # then additions and subtractions, left to right
    while pending:
        a, b, op = values[0], values[1], pending.pop(0)
        result = a + b if op == "+" else a - b
        steps.append(f"{a}{op}{b}={result}")
        values[0:2] = [result]
    return values[0], steps


def _intermediates(steps: list[str]) -> list[int]:
    return [int(step.rsplit("=", 1)[1]) for step in steps]


def draw_problem(rng: random.Random, spec: LevelSpec, max_value: int) -> tuple[str, int, list[str]]:
    """Draw one problem of a level whose every intermediate result lies in [0, max_value]."""
    while True:
        ops = [rng.choice(spec.ops) for _ in range(spec.n_operands - 1)]
        operands = [rng.randint(0, spec.max_operand) for _ in range(spec.n_operands)]
        for i, op in enumerate(ops):  # factors of * are small
            if op == "*":
                operands[i] = rng.randint(0, spec.max_factor)
                operands[i + 1] = rng.randint(0, spec.max_factor)
        value, steps = solve(operands, ops)
        if all(0 <= v <= max_value for v in _intermediates(steps)):
            expression = "".join(f"{a}{op}" for a, op in zip(operands, ops)) + str(operands[-1])
            return expression, value, steps


def make_example(level: int, expression: str, value: int, steps: list[str]) -> dict:
    """Build the example dict (id, prompt, answer, both response styles) for one problem."""
    digest = hashlib.sha1(expression.encode()).hexdigest()[:10]
    answer_line = f"Answer: {value}"
    return {
        "id": f"arith-L{level}-{digest}",
        "level": level,
        "prompt": expression,
        "answer": str(value),
        "responses": {"reasoning": "\n".join([*steps, answer_line]), "fast": answer_line},
    }


def generate_split(
    split: str,
    n_per_level: int,
    *,
    seed: int = 0,
    levels: list[int] | None = None,
    max_value: int = 99,
) -> list[dict]:
    """Generate up to ``n_per_level`` distinct problems per level for one split.

    Deterministic for (split, n_per_level, seed, levels, max_value). A level whose problem space is
    smaller than asked (level 1 has about 100 problems in all) yields what it has.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    levels = sorted(LEVELS) if levels is None else list(levels)
    examples: list[dict] = []
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"unknown arith level {level}; levels are {sorted(LEVELS)}")
        rng = random.Random(f"arith:{seed}:{split}:{level}:{max_value}")
        seen: set[str] = set()
        tries, max_tries = 0, 200 * n_per_level + 2000
        while len(seen) < n_per_level and tries < max_tries:
            tries += 1
            expression, value, steps = draw_problem(rng, LEVELS[level], max_value)
            if expression in seen or split_of(expression) != split:
                continue
            seen.add(expression)
            examples.append(make_example(level, expression, value, steps))
    return examples


def extract_answer(text: str) -> str | None:
    """The last ``Answer: N`` in a generated response, or None."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None
