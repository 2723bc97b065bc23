"""Scoring generated responses: exact match, per level, response length."""

from __future__ import annotations

from collections import defaultdict

from kdpipe.data.arith import extract_answer


def is_correct(example: dict, text: str) -> bool:
    """Exact match: of the final ``Answer: N`` when the example has an ``answer``, else of the whole text."""
    if example.get("answer") is not None:
        return extract_answer(text) == str(example["answer"])
    reference = example.get("reference")
    return reference is not None and text.strip() == str(reference).strip()


def summarize(examples: list[dict], generations: list) -> dict:
    """Accuracy overall and by level, mean response tokens, share of responses cut off by the token limit."""
    by_level: dict[int, list[bool]] = defaultdict(list)
    correct = [is_correct(ex, g.text) for ex, g in zip(examples, generations)]
    for ex, ok in zip(examples, correct):
        if ex.get("level") is not None:
            by_level[int(ex["level"])].append(ok)
    n = len(examples)
    return {
        "accuracy": sum(correct) / n if n else 0.0,
        "accuracy_by_level": {str(k): sum(v) / len(v) for k, v in sorted(by_level.items())},
        "mean_response_tokens": sum(g.num_tokens for g in generations) / n if n else 0.0,
        "truncated_fraction": sum(not g.finished for g in generations) / n if n else 0.0,
        "num_examples": n,
    }
