"""Start-of-pipeline checks of evaluations: each stage's metric resolves on its data; a sweep that optimises
an accuracy no stage can report is refused before it trains."""

from __future__ import annotations

import pytest

from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline import checks
from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS
from tests.helpers import TINY, chat_data_overrides, compose_cfg, third_party_chat, write_records


def resolved(overrides, tmp_path):
    cfg = compose_cfg([*TINY, *overrides], tmp_path / "run")
    return cfg, checks.check_evaluations(cfg, resolve_stages(cfg, set(STAGE_KINDS)))


def test_every_evaluating_stage_of_the_tiny_pipeline_gets_the_built_in_metric(tmp_path):
    _, metrics = resolved([], tmp_path)
    assert set(metrics) == {"sft_reasoning", "sft_fast", "kd_fast", "eval_student", "teacher_sft"}
    assert set(metrics.values()) == {"answer_match(answer_colon)"}


def test_one_stage_can_choose_its_own_metric(tmp_path):
    _, metrics = resolved(["pipeline.stages.kd_fast.eval.metric=loss"], tmp_path)
    assert metrics["kd_fast"] == "loss" and metrics["sft_fast"] == "answer_match(answer_colon)"


def test_a_sweep_optimising_accuracy_over_loss_only_stages_is_refused(tmp_path, monkeypatch):
    plain = write_records(tmp_path / "plain.jsonl", third_party_chat(4, numeric=False))
    cfg, metrics = resolved([*chat_data_overrides(plain), "pipeline.order=[sft_fast]"], tmp_path)
    assert metrics == {"sft_fast": "loss"}
    checks.check_optimized_metric(cfg, metrics)  # a single run: nothing to refuse, the table says n/a
    monkeypatch.setattr(checks, "in_sweep", lambda: True)
    with pytest.raises(PipelineConfigError, match="optimized_metric=accuracy: no stage of this pipeline scores"):
        checks.check_optimized_metric(cfg, metrics)
    cfg.optimized_metric = "loss"
    checks.check_optimized_metric(cfg, metrics)  # the loss always applies
