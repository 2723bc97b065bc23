"""The built-in task: determinism, disjoint splits, correct answers and levels."""

from __future__ import annotations

import re

import pytest

from kdpipe.data.arith import LEVELS, SPLITS, extract_answer, generate_split, solve, split_of


def test_generation_is_deterministic_for_a_seed():
    assert generate_split("train", 50, seed=3) == generate_split("train", 50, seed=3)
    assert generate_split("train", 50, seed=3) != generate_split("train", 50, seed=4)


def test_splits_share_no_problem_and_ids_are_unique():
    splits = {s: generate_split(s, 300, seed=0) for s in SPLITS}
    prompts = {s: {e["prompt"] for e in exs} for s, exs in splits.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    for exs in splits.values():
        ids = [e["id"] for e in exs]
        assert len(ids) == len(set(ids))
    # the split of a problem does not depend on the seed that drew it
    for e in generate_split("test", 50, seed=9):
        assert split_of(e["prompt"]) == "test"


def test_answers_match_python_arithmetic_and_steps_chain():
    for e in generate_split("val", 60, seed=1):
        assert int(e["answer"]) == eval(e["prompt"])  # the plain reference: Python's own precedence
        steps = e["responses"]["reasoning"].split("\n")
        assert steps[-1] == f"Answer: {e['answer']}" == e["responses"]["fast"]
        for step in steps[:-1]:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)
            assert 0 <= int(rhs) <= 99
        assert len(steps) - 1 == LEVELS[e["level"]].n_operands - 1  # one equation per operation


def test_levels_grow_in_operands_and_operators():
    exs = generate_split("train", 200, seed=0)
    for level, spec in LEVELS.items():
        mine = [e for e in exs if e["level"] == level]
        assert mine, level
        for e in mine:
            operands = re.findall(r"\d+", e["prompt"])
            assert len(operands) == spec.n_operands
            assert set(re.findall(r"[-+*]", e["prompt"])) <= set(spec.ops)
    assert "*" in "".join(e["prompt"] for e in exs if e["level"] == 5)


def test_solve_follows_precedence():
    value, steps = solve([2, 3, 4], ["+", "*"])
    assert value == 14 and steps == ["3*4=12", "2+12=14"]


def test_extract_answer_takes_the_last_answer():
    assert extract_answer("1+2=3\nAnswer: 3") == "3"
    assert extract_answer("Answer: 1\nAnswer: 42") == "42"
    assert extract_answer("no answer") is None


def test_unknown_split_or_level_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("dev", 3)
    with pytest.raises(ValueError, match="unknown arith level"):
        generate_split("train", 3, levels=[9])
