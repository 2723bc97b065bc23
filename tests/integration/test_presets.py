"""The paper's stage orders (pipeline/preset/) at tiny size, on-policy KD end to end, sequence-level KD on a
teacher's rollouts (and a rollout over prompt-only records), and shared teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe.cli.train import train
from kdpipe.data.sources import load_examples, subset_by_id
from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS
from kdpipe.pipeline.state import PipelineState
from kdpipe.utils.paths import config_dir
from tests.helpers import TEACHER_ROLLOUTS, chat_data_overrides, store_of, third_party_chat, write_records

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


def records_of(rollout_dir: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(rollout_dir.glob("part-*.jsonl")) for line in part.open()]


def test_a_student_trains_on_the_teachers_rollouts_kept_apart_from_its_own(tiny_cfg, tmp_path, one_thread):
    """Sequence-level KD: the teacher answers prompts (labels withheld) outside a train_fraction=0.5 subset, and
    sft and kd stages train on its answers (kd with the teacher's store on them), while the student's own
    rollouts of the same style, and the store scored on them, stay apart (on-policy KD reads those)."""
    order = ("pipeline.order=[teacher_sft,rollout_teacher,rollout_fast,score_teacher_rollouts,score_rollouts_fast,"
             "sft_synthetic,kd_synthetic,kd_fast_onpolicy]")  # fmt: skip
    onpolicy = [f"pipeline.stages.kd_fast_onpolicy.{key}" for key in
                ("onpolicy_lambda=1", "onpolicy_from=rollout_fast", "max_steps=2", "eval.enabled=false")]  # fmt: skip
    cfg = tiny_cfg(
        *TEACHER_ROLLOUTS, order, "pipeline.stages.score_rollouts_fast.rollouts_from=rollout_fast", *onpolicy
    )
    run = train(cfg)
    teacher_set, student_set = (run.result(name).rollouts["fast"] for name in ("rollout_teacher", "rollout_fast"))
    teacher = records_of(teacher_set)
    assert len(teacher) == 16 and teacher_set != student_set
    assert all(set(r["responses"]) == {"fast"} and "answer" not in r for r in teacher)  # no label reached it
    assert all(r["correct"] is not None for r in teacher)  # the built-in task checked each from its prompt
    human = {e["id"] for e in subset_by_id(load_examples(cfg.data, "train"), 0.5)}
    assert not {r["prompt_id"] for r in teacher} & human  # disjoint from what train_fraction=0.5 trains on
    manifest = json.loads((teacher_set / "manifest.json").read_text())
    assert manifest["withhold_labels"] and manifest["model_name"] == "teacher" and manifest["exclude_fraction"] == 0.5
    # two stores of fast rollouts, each keyed by the rollout stage it scored
    on_teacher = store_of(run, "score_teacher_rollouts", "fast", "rollouts")
    on_student = store_of(run, "score_rollouts_fast", "fast", "rollouts")
    assert on_teacher != on_student
    state = PipelineState.load(tmp_path / "run", resolve_stages(cfg, set(STAGE_KINDS)))
    assert state.stores[("fast", "rollouts", "rollout_teacher")] == on_teacher
    assert state.stores[("fast", "rollouts", "rollout_fast")] == on_student
    assert state.rollouts == {"rollout_teacher": teacher_set, "rollout_fast": student_set}
    sft, kd = run.result("sft_synthetic"), run.result("kd_synthetic")
    assert sft.reads["data_from"] == str(teacher_set) and 0 < sft.metrics["train_examples"] <= len(teacher)
    assert kd.reads == {"store": str(on_teacher), "data_from": str(teacher_set)}
    assert kd.metrics["kd_teacher_coverage"] == 1.0  # every label position of the teacher's answers was scored
    assert run.result("kd_fast_onpolicy").reads["onpolicy_store"] == str(on_student)


def test_a_rollout_samples_responses_to_prompt_only_records(tiny_cfg, tmp_path, one_thread):
    labelled = write_records(tmp_path / "labelled.jsonl", third_party_chat(4))
    prompts = [{"id": f"u{i}", "prompt": f"Tom has {i} apples and buys 2 more. How many now?"} for i in range(5)]
    chat = {"id": "c", "messages": [{"role": "user", "content": "Say hello"}]}
    train_file = write_records(tmp_path / "prompts.jsonl", [*prompts, chat])
    data = [*chat_data_overrides(labelled), f"data.files.train={train_file}"]
    run = train(tiny_cfg(*data, "pipeline.order=[rollout_fast]", "pipeline.stages.rollout_fast.n_samples=1"))
    records = records_of(run.result("rollout_fast").rollouts["fast"])
    assert [r["prompt_id"] for r in records] == [*(p["id"] for p in prompts), "c"]
    assert all("unlabelled" not in r and set(r["responses"]) == {"fast"} for r in records)
    assert all(r["correct"] is None for r in records)  # no answer to check against


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
