"""The built-in task ``arith``: multi-step integer arithmetic, generated deterministically from a seed.

Every example is a plain dict (the same shape the data loaders produce for user data)::

    {"id": "arith-L4-3f2a9c1b0d", "level": 4, "prompt": "7+3*6", "answer": "25",
     "responses": {"reasoning": "mul 3*6=18\\nadd 7+18=25\\ncheck 25-18=7\\nAnswer: 25",
                   "fast": "3*6=18 7+18=25\\nAnswer: 25"}}

Difficulty grows with the level: more operands, more digits, more operator kinds. Multiplication binds
tighter than addition and subtraction, so higher levels need an ordering of steps. Every intermediate result
stays in ``[0, max_value]``.

The two response styles (``version: 2``, the default) are what real systems call thinking and non-thinking
modes: ``reasoning`` is a long trace (each step named on its own line, then a check of the last step by its
inverse), ``fast`` a concise solution (the bare equations on one line). Both end in ``Answer: N``. Version 1
(``reasoning`` the bare equations one per line, ``fast`` the answer alone) stays for older runs; at CPU scale
no model learned its fast mode (docs/results.md).

**Label noise** (``label_noise``): the human labels of the training split may carry an annotator's systematic
slip, which a teacher trained on clean data does not make: ``slip`` drops the carry of a last-step addition or
the borrow of a last-step subtraction (``18+16=24``, ``52-17=45``), in the working and the answer alike, for a
share ``rate`` of the problems where the slip changes the result; ``random`` replaces the final answer alone
by another value (the working stays right). Validation and test splits are never noisy: they are the
references.

Splits never share a problem: the split of a problem is a pure function of its expression (a hash), so
generating more examples for one split can never pull a problem into another.
"""

from __future__ import annotations

import hashlib
import itertools
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


STEP_NAMES = {"+": "add", "-": "sub", "*": "mul"}
STEP_RE = re.compile(r"^(\d+)([-+*])(\d+)=(\d+)$")
NOISE_KINDS = ("slip", "random")


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


def check_step(step: str) -> str:
    """The check of a step by its inverse: ``18+16=34`` -> ``34-16=18``; ``6*7=42`` -> ``42/7=6``."""
    a, op, b, c = STEP_RE.match(step).groups()
    if op == "+":
        return f"{c}-{b}={a}"
    if op == "-":
        return f"{c}+{b}={a}"
    if b != "0":
        return f"{c}/{b}={a}"
    return f"{c}/{a}={b}" if a != "0" else f"{b}*{a}={c}"


def slipped(step: str) -> int | None:
    """The result of ``step`` with the carry (``+``) or the borrow (``-``) of its units digit dropped, the
    classic slips (``18+16`` -> 24, ``52-17`` -> 45); None when the step has neither (or is a product)."""
    a, op, b, _ = STEP_RE.match(step).groups()
    a, b = int(a), int(b)
    if op == "+" and a % 10 + b % 10 >= 10:
        return a + b - 10
    if op == "-" and a % 10 < b % 10:
        return 10 * (a // 10 - b // 10) + (b % 10 - a % 10)
    return None


def responses(steps: list[str], value: int, version: int = 2) -> dict[str, str]:
    """Both response styles of a problem solved by ``steps`` with answer ``value``."""
    answer_line = f"Answer: {value}"
    if version == 1:
        return {"reasoning": "\n".join([*steps, answer_line]), "fast": answer_line}
    named = [f"{STEP_NAMES[STEP_RE.match(step).group(2)]} {step}" for step in steps]
    return {
        "reasoning": "\n".join([*named, f"check {check_step(steps[-1])}", answer_line]),
        "fast": " ".join(steps) + "\n" + answer_line,
    }


def make_example(level: int, expression: str, value: int, steps: list[str], version: int = 2) -> dict:
    """Build the example dict (id, prompt, answer, both response styles) for one problem."""
    digest = hashlib.sha1(expression.encode()).hexdigest()[:10]
    return {
        "id": f"arith-L{level}-{digest}",
        "level": level,
        "prompt": expression,
        "answer": str(value),
        "responses": responses(steps, value, version),
    }


def _noise_draw(expression: str, seed: int) -> float:
    return int(hashlib.sha1(f"noise:{seed}:{expression}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def add_label_noise(
    example: dict, steps: list[str], rate: float, kind: str, *, seed: int = 0, max_value: int = 99, version: int = 2
) -> dict:
    """The example as a noisy human label would have it (``rate`` of the problems the noise can change;
    which ones is fixed by a hash of the expression and ``seed``). A changed example gets ``"noise": kind``
    and its ``answer`` is the label's (wrong) one: what a user holding these labels would see."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown label_noise kind {kind!r}; expected one of {NOISE_KINDS}")
    if rate <= 0.0 or _noise_draw(example["prompt"], seed) >= rate:
        return example
    value = int(example["answer"])
    if kind == "slip":
        wrong = slipped(steps[-1])
        if wrong is None:
            return example
        a, op, b, _ = STEP_RE.match(steps[-1]).groups()
        steps = [*steps[:-1], f"{a}{op}{b}={wrong}"]
        made = responses(steps, wrong, version)
        if version == 2:  # the annotator's check "confirms" the slipped result
            lines = made["reasoning"].split("\n")
            lines[-2] = f"check {wrong}{'-' if op == '+' else '+'}{b}={a}"
            made["reasoning"] = "\n".join(lines)
    else:
        rng, responses_ = random.Random(f"noise-value:{seed}:{example['prompt']}"), example["responses"]
        wrong = rng.choice([v for v in range(max_value + 1) if v != value])
        made = {style: text.rsplit("Answer: ", 1)[0] + f"Answer: {wrong}" for style, text in responses_.items()}
    return {**example, "answer": str(wrong), "responses": made, "noise": kind}


def generate_split(
    split: str,
    n_per_level: int,
    *,
    seed: int = 0,
    levels: list[int] | None = None,
    max_value: int = 99,
    version: int = 2,
    noise_rate: float = 0.0,
    noise_kind: str = "slip",
    noise_seed: int = 0,
) -> list[dict]:
    """Generate up to ``n_per_level`` distinct problems per level for one split.

    Deterministic for all arguments. A level whose problem space is smaller than asked (level 1 has about 100
    problems in all) yields what it has. ``noise_*`` (:func:`add_label_noise`) apply to the train split only.
    The problems drawn do not depend on ``version`` or the noise.
    """
    if version not in (1, 2):
        raise ValueError(f"unknown arith version {version}; versions are 1 and 2")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"label_noise.rate must be in [0, 1], got {noise_rate}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    levels = sorted(LEVELS) if levels is None else list(levels)
    examples: list[dict] = []
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"unknown arith level {level}; levels are {sorted(LEVELS)}")
        rng = random.Random(f"arith:{seed}:{split}:{level}:{max_value}")
        for expression, value, steps in _draws(rng, LEVELS[level], split, n_per_level, max_value):
            example = make_example(level, expression, value, steps, version)
            if split == "train" and noise_rate > 0.0:
                example = add_label_noise(
                    example, steps, noise_rate, noise_kind, seed=noise_seed, max_value=max_value, version=version
                )
            examples.append(example)
    return examples


def _space(spec: LevelSpec) -> int | None:
    """How many expressions a level without ``*`` can write (None with ``*``: its factors are redrawn)."""
    if "*" in spec.ops:
        return None
    return (spec.max_operand + 1) ** spec.n_operands * len(spec.ops) ** (spec.n_operands - 1)


def _draws(rng: random.Random, spec: LevelSpec, split: str, n: int, max_value: int):
    """Up to ``n`` distinct problems of ``split`` at one level. A level whose whole space is small next to
    ``n`` (levels 1 and 2: ~100 and ~1900 expressions) is enumerated and shuffled: sampling it until 200 n
    draws failed took a minute for the default train split. Larger levels are sampled."""
    space = _space(spec)
    if space is not None and space <= 50 * n:
        found = []
        for operands in itertools.product(range(spec.max_operand + 1), repeat=spec.n_operands):
            for ops in itertools.product(spec.ops, repeat=spec.n_operands - 1):
                value, steps = solve(list(operands), list(ops))
                expression = "".join(f"{a}{op}" for a, op in zip(operands, ops)) + str(operands[-1])
                if all(0 <= v <= max_value for v in _intermediates(steps)) and split_of(expression) == split:
                    found.append((expression, value, steps))
        rng.shuffle(found)
        yield from found[:n]
        return
    seen: set[str] = set()
    tries, max_tries = 0, 200 * n + 2000
    while len(seen) < n and tries < max_tries:
        tries += 1
        expression, value, steps = draw_problem(rng, spec, max_value)
        if expression in seen or split_of(expression) != split:
            continue
        seen.add(expression)
        yield expression, value, steps


def extract_answer(text: str) -> str | None:
    """The last ``Answer: N`` in a generated response, or None."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None
