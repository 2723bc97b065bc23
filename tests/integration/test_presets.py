"""The paper's stage orders (pipeline/preset/) at tiny size, on-policy KD end to end, and shared teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe.cli.train import train
from kdpipe.errors import PipelineConfigError
from kdpipe.utils.paths import config_dir
from tests.helpers import store_of

PRESETS = sorted(p.stem for p in (Path(config_dir()) / "pipeline" / "preset").glob("*.yaml"))


def test_the_papers_orders_are_all_presets():
    assert {"sft_r", "sft_r_sft_f", "sft_r_sft_f_kd_f", "alternation", "alternation_onpolicy"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_runs_at_tiny_size(tiny_cfg, preset, one_thread):
    cfg = tiny_cfg(f"pipeline/preset={preset}")
    run = train(cfg)
    names = [s["name"] for s in run.results["stages"]]
    assert names == list(cfg.pipeline.order)
    assert all(s["status"] == "done" for s in run.results["stages"])
    for stage in run.results["stages"]:
        if stage["kind"] == "kd" and stage["name"].endswith("_onpolicy"):
            assert stage["metrics"]["onpolicy_examples"] > 0
            assert "rollouts" in run.result(stage["name"]).reads["onpolicy_store"]


def test_onpolicy_kd_trains_on_the_students_scored_rollouts(tiny_cfg, tmp_path, one_thread):
    run = train(tiny_cfg("pipeline/preset=sft_r_sft_f_kd_f_onpolicy"))
    rollout = run.result("rollout_fast")
    rollout_dir = rollout.rollouts["fast"]
    records = [json.loads(line) for part in sorted(rollout_dir.glob("part-*.jsonl")) for line in part.open()]
    assert rollout.metrics["samples"] == len(records) == 2 * 24
    store = store_of(run, "score_rollouts_fast", "fast", "rollouts")
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["data"]["split"] == "rollouts" and manifest["data"]["num_examples"] == len(records)
    kd = run.result("kd_fast_onpolicy")
    assert kd.reads["onpolicy_store"] == str(store) and kd.metrics["onpolicy_examples"] == len(records)


def test_onpolicy_kd_without_rollouts_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match="rollout"):
        train(tiny_cfg("pipeline.order=[teacher_sft,score,kd_fast_onpolicy]"))


def test_a_shared_teacher_is_trained_once_for_every_run(tiny_cfg, tmp_path, one_thread):
    share = ["pipeline.stages.teacher_sft.share=true", "pipeline.stages.teacher_sft.seed=5"]
    first = train(tiny_cfg("pipeline.order=[teacher_sft,score,kd_fast]", "seed=1", *share, run_dir=tmp_path / "a"))
    second = train(tiny_cfg("pipeline.order=[teacher_sft,score,kd_fast]", "seed=2", *share, run_dir=tmp_path / "b"))
    shared = Path(first.result("teacher_sft").metrics["shared_to"])
    assert shared.parent == tmp_path / "logs" / "shared" and (shared / "export" / "model.safetensors").exists()
    assert second.result("teacher_sft").metrics["shared_from"] == str(shared)
    assert second.result("teacher_sft").export == shared / "export"
    assert not (tmp_path / "b" / "01_teacher_sft" / "export").exists()  # not trained again
    assert second.result("score").metrics["reasoning_store"]["reused"]  # so its store is reused too
    state = json.loads((tmp_path / "b" / "pipeline_state.json").read_text())
    assert state["stages"][0]["result"]["export"] == str(shared / "export")
    # a different teacher seed is a different teacher
    third = train(tiny_cfg("pipeline.order=[teacher_sft]", "pipeline.stages.teacher_sft.share=true",
                           "pipeline.stages.teacher_sft.seed=6", run_dir=tmp_path / "c"))  # fmt: skip
    assert "shared_to" in third.result("teacher_sft").metrics
