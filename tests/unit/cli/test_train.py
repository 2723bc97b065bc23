"""kdpipe.cli.train without running a pipeline: the metric a sweeper optimises, a run's typed stage results, and
the job configs ``kdpipe-train -m ... --cfg job`` prints. (The command itself: tests/integration/test_cli.py.)"""

from __future__ import annotations

import re

import pytest
import yaml

from kdpipe.cli.train import final_metric, show_sweep_configs
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.state import PipelineRun, StageRecord


def test_the_optimised_metric_is_the_last_stage_that_reports_it():
    payload = {"stages": [{"name": "a", "metrics": {"accuracy": 0.5, "loss": 2}},
                          {"name": "b", "metrics": {"loss": 1}}, {"name": "c", "metrics": {}}]}  # fmt: skip
    assert final_metric(payload, "accuracy") == 0.5 and final_metric(payload, "loss") == 1.0
    assert isinstance(final_metric(payload, "loss"), float)
    assert final_metric(payload, "missing") is None


def test_a_run_gives_the_result_of_the_last_finished_stage_of_a_name(tmp_path):
    first, again = StageResult({"n": 1}, export=tmp_path / "a"), StageResult({"n": 2}, export=tmp_path / "b")
    stages = [StageRecord("sft", "sft", "student", "01_sft", "done", first),
              StageRecord("sft", "sft", "student", "02_sft", "done", again),
              StageRecord("kd", "kd", "student", "03_kd", "running")]  # fmt: skip
    run = PipelineRun(tmp_path, {"stages": []}, stages)
    assert run.result("sft") is again
    with pytest.raises(KeyError, match="no finished stage 'kd'"):
        run.result("kd")


def test_a_sweep_prints_every_jobs_config(capsys):
    show_sweep_configs(["-m", "seed=1,2", "pipeline.stages.kd_fast.loss.divergence=fkl,jsd", "--cfg", "job"])
    parts = re.split(r"^# job \d+: (.*)$", capsys.readouterr().out, flags=re.MULTILINE)
    jobs = [(overrides, yaml.safe_load(config)) for overrides, config in zip(parts[1::2], parts[2::2])]
    assert [overrides for overrides, _ in jobs] == [
        f"seed={seed} pipeline.stages.kd_fast.loss.divergence={divergence}"
        for seed in (1, 2)
        for divergence in ("fkl", "jsd")
    ]
    got = [(cfg["seed"], cfg["pipeline"]["stages"]["kd_fast"]["loss"]["divergence"]) for _, cfg in jobs]
    assert got == [(1, "fkl"), (1, "jsd"), (2, "fkl"), (2, "jsd")]
