"""The built-in task: determinism, disjoint splits, correct answers and levels."""

from __future__ import annotations

import re

import pytest

from kdpipe.data.arith import (
    LEVELS,
    SPLITS,
    check_step,
    extract_answer,
    generate_split,
    slipped,
    solve,
    split_of,
)


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


def test_answers_match_python_arithmetic_and_steps_chain_version_1():
    for e in generate_split("val", 60, seed=1, version=1):
        assert int(e["answer"]) == eval(e["prompt"])  # the plain reference: Python's own precedence
        steps = e["responses"]["reasoning"].split("\n")
        assert steps[-1] == f"Answer: {e['answer']}" == e["responses"]["fast"]
        for step in steps[:-1]:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)
            assert 0 <= int(rhs) <= 99
        assert len(steps) - 1 == LEVELS[e["level"]].n_operands - 1  # one equation per operation


def test_version_2_reasoning_names_steps_and_checks_the_last_fast_is_one_line():
    for e in generate_split("val", 60, seed=1):
        assert int(e["answer"]) == eval(e["prompt"])
        lines = e["responses"]["reasoning"].split("\n")
        assert lines[-1] == f"Answer: {e['answer']}"
        named, check = lines[:-2], lines[-2]
        assert len(named) == LEVELS[e["level"]].n_operands - 1
        equations = []
        for line in named:
            name, eq = line.split(" ")
            lhs, rhs = eq.split("=")
            assert name == {"+": "add", "-": "sub", "*": "mul"}[re.search(r"[-+*]", lhs).group()]
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) <= 99
            equations.append(eq)
        assert check.startswith("check ")
        lhs, rhs = check[len("check ") :].split("=")
        assert eval(lhs) == int(rhs)  # the inverse holds
        fast_work, fast_answer = e["responses"]["fast"].split("\n")
        assert fast_work == " ".join(equations) and fast_answer == lines[-1]
        # the same problems as version 1: the styles change, not the draw
    assert [e["prompt"] for e in generate_split("val", 60, seed=1)] == [
        e["prompt"] for e in generate_split("val", 60, seed=1, version=1)
    ]


def test_check_step_inverts_every_operation():
    assert check_step("18+16=34") == "34-16=18"
    assert check_step("52-17=35") == "35+17=52"
    assert check_step("6*7=42") == "42/7=6"
    assert check_step("6*0=0") == "0/6=0"
    assert check_step("0*0=0") == "0*0=0"


def test_slips_drop_the_carry_or_the_borrow():
    assert slipped("18+16=34") == 24 and slipped("3+8=11") == 1
    assert slipped("52-17=35") == 45 and slipped("12-9=3") == 17
    assert slipped("12+13=25") is None and slipped("57-14=43") is None and slipped("6*7=42") is None


def test_label_noise_touches_the_train_split_only_at_its_rate_and_is_deterministic():
    clean = generate_split("train", 600, seed=0)
    noisy = generate_split("train", 600, seed=0, noise_rate=0.6)
    assert noisy == generate_split("train", 600, seed=0, noise_rate=0.6)
    assert [e["prompt"] for e in noisy] == [e["prompt"] for e in clean]
    changeable = [c for c in clean if slipped(c["responses"]["fast"].split("\n")[0].split(" ")[-1]) is not None]
    changed = [n for n in noisy if n.get("noise")]
    assert 0.5 < len(changed) / len(changeable) < 0.7
    for n in changed:
        last = n["responses"]["fast"].split("\n")[0].split(" ")[-1]
        lhs, rhs = last.split("=")
        assert int(rhs) != eval(lhs) and n["answer"] == rhs  # the label's answer follows the slipped working
        assert n["responses"]["reasoning"].endswith(f"Answer: {rhs}")
    for split in ("val", "test"):
        assert generate_split(split, 100, noise_rate=1.0) == generate_split(split, 100)
    rand = [e for e in generate_split("train", 300, noise_rate=0.5, noise_kind="random") if e.get("noise")]
    assert rand and all(int(e["answer"]) != eval(e["prompt"]) for e in rand)


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
    with pytest.raises(ValueError, match="unknown arith version"):
        generate_split("train", 3, version=3)
    with pytest.raises(ValueError, match="unknown label_noise kind"):
        generate_split("train", 30, noise_rate=0.5, noise_kind="typo")
