"""kdpipe-aggregate on a real multirun: a 2 x 2 version of the curriculum ablation on the tiny pipeline, then
its summary. (Grouping and statistics on hand-made job folders: tests/unit/cli/test_aggregate.py.)"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_ablation_multirun_then_aggregate_end_to_end(tiny_cfg, tmp_path):
    """The real entry points: a 2 x 2 version of the ablation on the tiny pipeline, then the summary."""
    args = tiny_cfg.args(
        "experiment=curriculum_ablation",
        "curriculum=random,competence",  # command-line sweeps replace the experiment's params
        "seed=1,2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    run_cli("kdpipe-train", *args, cwd=tmp_path)
    proc = run_cli("kdpipe-aggregate", tmp_path / "sweep", "--baseline", "random", "--n-boot", "200", cwd=tmp_path)
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [g["group"] for g in summary["groups"]] == ["curriculum=random", "curriculum=competence"]
    assert all(g["accuracy"]["n"] == 2 and g["warning"] == "n=2 < 5" for g in summary["groups"])
    assert "curriculum=competence" in proc.stdout
    # paired by seed, and bootstrapped over the test problems of the eval stage's generations.jsonl
    (comparison,) = summary["comparisons"]
    assert comparison["name"] == "curriculum=competence - curriculum=random"
    assert comparison["paired"]["seeds"] == ["seed=1", "seed=2"] and comparison["paired"]["ci"]["low"] is not None
    assert comparison["bootstrap"]["n_problems"] > 0 and comparison["bootstrap"]["seeds"] == ["seed=1", "seed=2"]
    assert (tmp_path / "sweep" / "comparisons.png").stat().st_size > 0
