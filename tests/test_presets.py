"""The paper's stage orders (pipeline/preset/) at tiny size, on-policy KD end to end, and shared teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe.cli.train import train
from kdpipe.utils.paths import config_dir

PRESETS = sorted(p.stem for p in (Path(config_dir()) / "pipeline" / "preset").glob("*.yaml"))


def test_the_papers_orders_are_all_presets():
    assert {"sft_r", "sft_r_sft_f", "sft_r_sft_f_kd_f", "alternation", "alternation_onpolicy"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_runs_at_tiny_size(tiny_cfg, preset, one_thread):
    cfg = tiny_cfg(f"pipeline/preset={preset}")
    payload = train(cfg)
    names = [s["name"] for s in payload["stages"]]
    assert names == list(cfg.pipeline.order)
    assert all(s["status"] == "done" for s in payload["stages"])
    for stage in payload["stages"]:
        if stage["kind"] == "kd" and stage["name"].endswith("_onpolicy"):
            assert stage["metrics"]["onpolicy_examples"] > 0
            assert "rollouts" in stage["metrics"]["onpolicy_store"]


def test_onpolicy_kd_trains_on_the_students_scored_rollouts(tiny_cfg, tmp_path, one_thread):
    payload = train(tiny_cfg("pipeline/preset=sft_r_sft_f_kd_f_onpolicy"))
    stages = {s["name"]: s for s in payload["stages"]}
    rollout_dir = Path(stages["rollout_fast"]["metrics"]["rollouts"]["fast"])
    records = [json.loads(line) for part in sorted(rollout_dir.glob("part-*.jsonl")) for line in part.open()]
    assert stages["rollout_fast"]["metrics"]["samples"] == len(records) == 2 * 24
    store = Path(stages["score_rollouts_fast"]["metrics"]["stores"]["fast:rollouts"])
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["data"]["split"] == "rollouts" and manifest["data"]["num_examples"] == len(records)
    kd = stages["kd_fast_onpolicy"]["metrics"]
    assert kd["onpolicy_store"] == str(store) and kd["onpolicy_examples"] == len(records)


def test_onpolicy_kd_without_rollouts_is_refused(tiny_cfg):
    from kdpipe.errors import PipelineConfigError

    with pytest.raises(PipelineConfigError, match="rollout"):
        train(tiny_cfg("pipeline.order=[teacher_sft,score,kd_fast_onpolicy]"))


def test_a_shared_teacher_is_trained_once_for_every_run(tiny_cfg, tmp_path, one_thread):
    share = ["++pipeline.stages.teacher_sft.share=true", "++pipeline.stages.teacher_sft.seed=5"]
    first = train(tiny_cfg("pipeline.order=[teacher_sft,score,kd_fast]", "seed=1", *share, run_dir=tmp_path / "a"))
    second = train(tiny_cfg("pipeline.order=[teacher_sft,score,kd_fast]", "seed=2", *share, run_dir=tmp_path / "b"))
    shared = Path(first["stages"][0]["metrics"]["shared_to"])
    assert shared.parent == tmp_path / "logs" / "shared" and (shared / "export" / "model.safetensors").exists()
    assert second["stages"][0]["metrics"]["shared_from"] == str(shared)
    assert not (tmp_path / "b" / "01_teacher_sft" / "export").exists()  # not trained again
    assert second["stages"][1]["metrics"]["reasoning_store"]["reused"]  # so its store is reused too
    state = json.loads((tmp_path / "b" / "pipeline_state.json").read_text())
    assert state["stages"][0]["export"] == str(shared / "export")
    # a different teacher seed is a different teacher
    third = train(tiny_cfg("pipeline.order=[teacher_sft]", "++pipeline.stages.teacher_sft.share=true",
                           "++pipeline.stages.teacher_sft.seed=6", run_dir=tmp_path / "c"))  # fmt: skip
    assert "shared_to" in third["stages"][0]["metrics"]
