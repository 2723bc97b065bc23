"""Paired comparisons for ``kdpipe-aggregate``: two cells of a multirun (``--baseline``, ``--pair``) or two
stages of the same jobs (``--compare-stages``), paired by seed. Each gets the mean difference with its
Student-t interval over seeds, the paired bootstrap interval over test problems (from the stages'
``generations.jsonl``), and a verdict."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kdpipe.utils.stats import BootstrapCI, PairedDifference, bootstrap_paired, paired_difference, seed_warning, verdict


@dataclass
class Cell:
    """One side of a comparison: accuracy per seed key (``seed=3``) and, for the seeds whose stage wrote a
    ``generations.jsonl``, the score per test problem (seed -> example id -> score)."""

    label: str
    accuracy: dict[str, float] = field(default_factory=dict)
    problems: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """``a - b`` (``b`` the baseline or control): paired over seeds, bootstrapped over problems (None when
    no seed has per-problem scores on both sides)."""

    name: str
    a: str
    b: str
    paired: PairedDifference
    bootstrap: BootstrapCI | None
    verdict: str
    unpaired: tuple[str, ...]  # seeds only one side has: left out


def problem_scores(path: Path) -> dict[str, float] | None:
    """Example id -> score from a stage's ``generations.jsonl`` (records without a score left out); None when
    the stage wrote none (a loss-only metric, lm-eval, a run from before the file)."""
    if not path.exists():
        return None
    scores = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("score") is not None:
                scores[str(record["id"])] = float(record["score"])
    return scores


def compare(a: Cell, b: Cell, name: str | None = None, n_boot: int = 10_000, seed: int = 0) -> Comparison:
    """The paired difference ``a - b`` over the seeds both cells have, and the bootstrap over problems."""
    paired = paired_difference(a.accuracy, b.accuracy)
    boot = None
    if any(s in b.problems for s in a.problems):
        boot = bootstrap_paired(a.problems, b.problems, n_boot=n_boot, seed=seed)
    intervals = [(paired.ci.low, paired.ci.high)] + ([(boot.low, boot.high)] if boot is not None else [])
    unpaired = tuple(s for s in [*a.accuracy, *b.accuracy] if s not in paired.seeds)
    return Comparison(name or f"{a.label} - {b.label}", a.label, b.label, paired, boot, verdict(*intervals), unpaired)


def resolve_cell(name: str, labels: list[str], flag: str) -> str:
    """The cell ``name`` designates: a label (``curriculum=random``), one of its ``key=value`` parts, or a
    value (``random``) that exactly one cell has."""
    if name in labels:
        return name
    matches = [label for label in labels if any(name in (part, part.split("=", 1)[-1]) for part in label.split())]
    if len(matches) == 1:
        return matches[0]
    found = f"matches several cells ({', '.join(matches)})" if matches else "matches no cell"
    raise KeyError(f"{flag} {name}: {found}; the cells: {', '.join(labels)}")


def _pct(value: float | None, sign: bool = True) -> str:
    return "-" if value is None else f"{100 * value:{'+' if sign else ''}.1f}"


def _interval(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"[{_pct(low)}, {_pct(high)}]"


def comparison_rows(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    """The paired-difference table: points of accuracy, ``a - b``."""
    header = ["comparison", "seeds", "Δ acc pts", "95% t CI", "problems", "95% bootstrap CI", "verdict", "note"]
    rows = []
    for c in comparisons:
        ci, boot = c.paired.ci, c.bootstrap
        spread = f" ± {_pct(ci.std, sign=False)}" if ci.std is not None else ""
        notes = [seed_warning(ci.n)] if seed_warning(ci.n) else []
        if c.unpaired:
            notes.append(f"unpaired: {', '.join(c.unpaired)}")
        if boot is None:
            notes.append("no generations.jsonl")
        elif boot.seeds != c.paired.seeds:
            notes.append(f"bootstrap over {len(boot.seeds)} seeds")
        rows.append([
            c.name,
            str(ci.n),
            _pct(ci.mean) + spread,
            _interval(ci.low, ci.high),
            str(boot.n_problems) if boot else "-",
            _interval(boot.low, boot.high) if boot else "n/a",
            c.verdict,
            "; ".join(notes),
        ])  # fmt: skip
    return header, rows
