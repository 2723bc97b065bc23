"""The stage pipeline end to end on tiny models: outputs, resume after a crash, and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdpipe.errors import PipelineConfigError
from kdpipe.cli.train import train


def test_tiny_pipeline_writes_every_output(tiny_cfg, tmp_path):
    started = time.perf_counter()
    payload = train(tiny_cfg())
    assert time.perf_counter() - started < 60
    run = tmp_path / "run"
    trained = ["01_teacher_sft", "03_sft_reasoning", "04_sft_fast", "05_kd_fast"]
    for name in trained:
        stage = run / name
        assert (stage / "checkpoints" / "last.ckpt").exists()
        assert (stage / "export" / "model.safetensors").exists()
        assert (stage / "export" / "tokenizer.json").exists()
        metrics = json.loads((stage / "metrics.json").read_text())["metrics"]
        assert {"accuracy", "accuracy_by_level", "mean_response_tokens", "train_loss", "tokens_per_s"} <= set(metrics)
        assert (stage / "generations.jsonl").exists()
    kd = json.loads((run / "05_kd_fast" / "metrics.json").read_text())["metrics"]
    for key in ("kd_teacher_topk_mass", "kd_top1_agreement", "kd_teacher_coverage", "train_divergence", "train_ce"):
        assert key in kd, key
    assert kd["kd_teacher_coverage"] == 1.0  # every label position of the fast data was scored
    assert any(key.startswith("kd_divergence_L") for key in kd)
    score = json.loads((run / "02_score" / "metrics.json").read_text())["metrics"]
    assert set(score["stores"]) == {"reasoning", "fast"}
    # k=8 here: per-row fields and shard headers weigh more than at k=64 (the codec tests check 3 bytes there)
    assert not score["fast_store"]["reused"] and score["fast_store"]["bytes_per_entry"] < 5
    assert json.loads((run / "06_eval_student" / "metrics.json").read_text())["metrics"]["num_examples"] == 20
    results = json.loads((run / "results.json").read_text())
    assert results == json.loads(json.dumps(payload))
    assert [s["name"] for s in results["stages"]] == [
        "teacher_sft",
        "score",
        "sft_reasoning",
        "sft_fast",
        "kd_fast",
        "eval_student",
    ]
    for stage in results["stages"]:
        assert {"name", "kind", "model", "metrics"} <= set(stage)
        if stage["kind"] != "score":
            assert set(stage["metrics"]["accuracy_by_level"]) == {"1", "2", "3", "4", "5"}
    assert "| kd_fast |" in (run / "results.md").read_text()
    assert (run / "results.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads((run / "pipeline_state.json").read_text())
    assert all(s["status"] == "done" for s in state["stages"])
    assert state["model_paths"] == {"teacher": "01_teacher_sft/export", "student": "05_kd_fast/export"}
    assert state["stores"] == score["stores"]
    assert (run / "config.yaml").exists() and (run / "config_tree.log").exists()
    # the eval stage evaluated the export of the student's last training stage
    generations = (run / "05_kd_fast" / "generations.jsonl").read_text()
    assert generations == (run / "06_eval_student" / "generations.jsonl").read_text()


def test_a_second_run_reuses_the_teacher_store_instead_of_rescoring(tiny_cfg, tmp_path):
    order = "pipeline.order=[teacher_sft,score,kd_fast]"
    train(tiny_cfg(order, run_dir=tmp_path / "first"))
    first = json.loads((tmp_path / "first" / "02_score" / "metrics.json").read_text())["metrics"]
    train(tiny_cfg(order, run_dir=tmp_path / "second"))
    second = json.loads((tmp_path / "second" / "02_score" / "metrics.json").read_text())["metrics"]
    assert second["stores"] == first["stores"]  # the same teacher, data, k and T: the same store
    assert second["fast_store"]["reused"] and second["reasoning_store"]["reused"]


def test_kd_without_a_store_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match=r"has no teacher store of its label sequences: put a `score` stage"):
        train(tiny_cfg("pipeline.order=[kd_fast]"))


def test_each_stage_starts_from_the_previous_stage_of_its_model(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "pipeline.order=[sft_reasoning,teacher_sft,sft_fast]",
        "pipeline.stages.sft_fast.max_steps=1",
        "+pipeline.stages.sft_fast.optimizer.lr=1e-12",  # one step that barely moves the weights
    )
    train(cfg)
    run = tmp_path / "run"
    before = load_file(run / "01_sft_reasoning" / "export" / "model.safetensors")
    after = load_file(run / "03_sft_fast" / "export" / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.allclose(before[key], after[key], atol=1e-6), key


def test_interrupted_stage_resumes_and_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    order = "pipeline.order=[teacher_sft,score,kd_fast]"
    reference_dir = tmp_path / "reference"
    train(tiny_cfg(order, run_dir=reference_dir))

    crashed_dir = tmp_path / "crashed"
    marker = tmp_path / "crashed.marker"
    crash = f"+callbacks.crash={{_target_: tests.helpers.CrashAt, stage: 03_kd_fast, step: 4, marker: '{marker}'}}"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(order, crash, run_dir=crashed_dir))
    state = json.loads((crashed_dir / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done", "running"]
    ckpt = torch.load(crashed_dir / "03_kd_fast" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3  # the checkpoint before the crash
    teacher_mtime = (crashed_dir / "01_teacher_sft" / "export" / "model.safetensors").stat().st_mtime

    payload = train(tiny_cfg(f"resume={crashed_dir}"))
    assert [s["status"] for s in payload["stages"]] == ["done", "done", "done"]
    # the finished stage was skipped, not redone
    assert (crashed_dir / "01_teacher_sft" / "export" / "model.safetensors").stat().st_mtime == teacher_mtime
    # the resumed stage saw the same batches from the same state: identical weights
    resumed = load_file(crashed_dir / "03_kd_fast" / "export" / "model.safetensors")
    reference = load_file(reference_dir / "03_kd_fast" / "export" / "model.safetensors")
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6), key


@pytest.mark.parametrize("crash_step", [3, 5])  # checkpoints every 2 steps: resume before and after validation
def test_a_stage_resumed_mid_epoch_runs_the_rest_of_its_plan(tiny_cfg, tmp_path, crash_step):
    overrides = ["pipeline.order=[sft_reasoning]", "++pipeline.stages.sft_reasoning.checkpoint_every_n_steps=2"]
    train(tiny_cfg(*overrides, run_dir=tmp_path / "reference"))
    marker = tmp_path / "crashed.marker"
    at = f"stage: sft_reasoning, step: {crash_step}, marker: '{marker}'"
    crash = f"+callbacks.crash={{_target_: tests.helpers.CrashAt, {at}}}"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*overrides, crash, run_dir=tmp_path / "crashed"))
    payload = train(tiny_cfg(f"resume={tmp_path / 'crashed'}"))
    assert payload["stages"][0]["metrics"]["steps"] == 8  # all of max_steps, not the plan minus the skipped part
    resumed = load_file(tmp_path / "crashed" / "01_sft_reasoning" / "export" / "model.safetensors")
    reference = load_file(tmp_path / "reference" / "01_sft_reasoning" / "export" / "model.safetensors")
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6), key


def test_unknown_stage_name_in_order_is_refused_before_training(tiny_cfg, tmp_path):
    with pytest.raises(PipelineConfigError, match=r"unknown stage 'sft_fats'.*did you mean 'sft_fast'"):
        train(tiny_cfg("pipeline.order=[teacher_sft,sft_fats]"))
    assert not (tmp_path / "run").exists()


def test_unknown_stage_kind_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match=r"kind='sfd' is not a stage kind.*did you mean 'sft'"):
        train(tiny_cfg("pipeline.stages.sft_fast.kind=sfd"))


def test_typo_in_a_stage_key_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match=r"pipeline\.stages\.sft_fast\.max_step \(did you mean 'max_steps'"):
        train(tiny_cfg("+pipeline.stages.sft_fast.max_step=3"))
    with pytest.raises(PipelineConfigError, match=r"pipeline\.stages\.sft_fast\.eval\.splt"):
        train(tiny_cfg("+pipeline.stages.sft_fast.eval.splt=val"))


def test_stage_naming_an_unknown_model_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match=r"model='techer' is not a configured model"):
        train(tiny_cfg("pipeline.stages.sft_fast.model=techer"))


def test_missing_resume_directory_is_refused(tiny_cfg, tmp_path):
    with pytest.raises(PipelineConfigError, match=r"resume directory .*does not exist"):
        train(tiny_cfg(f"resume={tmp_path / 'nope'}"))


def test_existing_run_directory_is_not_overwritten(tiny_cfg):
    train(tiny_cfg("pipeline.order=[eval_student]"))
    with pytest.raises(PipelineConfigError, match="already holds a run"):
        train(tiny_cfg("pipeline.order=[eval_student]"))


def test_config_key_typo_fails_at_composition(tiny_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_step"):
        tiny_cfg("trainer.max_step=3")


def test_a_pretrained_teacher_export_is_loaded_with_its_own_tokenizer(tiny_cfg, tmp_path):
    train(tiny_cfg("pipeline.order=[teacher_sft]", run_dir=tmp_path / "teacher"))
    export = tmp_path / "teacher" / "01_teacher_sft" / "export"
    cfg = tiny_cfg(
        "models.teacher.source=pretrained",
        f"models.teacher.path={export}",
        "pipeline.order=[score,kd_fast]",
        run_dir=tmp_path / "reuse",
    )
    payload = train(cfg)
    store = payload["stages"][0]["metrics"]["stores"]["fast"]
    manifest = json.loads((Path(store) / "manifest.json").read_text())
    trained = load_file(export / "model.safetensors")
    assert manifest["teacher"]["weights_sha256"]  # fingerprinted from the loaded export
    assert manifest["tokenizer"]["vocab_size"] == trained["model.embed_tokens.weight"].shape[0]


@pytest.mark.parametrize("logger", ["tensorboard", "csv", "none"])
def test_each_logger_writes_where_documented(tiny_cfg, tmp_path, logger):
    train(tiny_cfg(f"logger={logger}", "pipeline.order=[sft_fast]"))
    logs = tmp_path / "run" / "01_sft_fast" / "logs"
    if logger == "tensorboard":
        assert list(logs.glob("tensorboard/events.out.tfevents.*"))
    elif logger == "csv":
        assert "train/loss" in (logs / "csv" / "metrics.csv").read_text()
    else:
        assert not logs.exists()
    assert (tmp_path / "run" / "results.json").exists()


def test_a_stage_can_order_its_data_by_teacher_nll_from_the_store(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "pipeline.order=[teacher_sft,score,sft_reasoning,sft_fast]",
        "+pipeline.stages.sft_reasoning.curriculum.scorer=teacher_nll",
        "+pipeline.stages.sft_reasoning.curriculum.schedule=sorted",
    )
    payload = train(cfg)
    store = payload["stages"][1]["metrics"]["stores"]["reasoning"]
    assert (Path(store) / "scores" / "teacher_nll.json").exists()  # computed once, cached beside the store
    settings = json.loads((tmp_path / "run" / "03_sft_reasoning" / "metrics.json").read_text())["settings"]
    assert settings["curriculum"]["scorer"] == "teacher_nll"
    fast = json.loads((tmp_path / "run" / "04_sft_fast" / "metrics.json").read_text())["settings"]
    assert fast["curriculum"]["scorer"] == {"name": "level"}  # the other stages keep the default


def test_student_loss_curriculum_scores_with_the_stage_start_model_and_resumes_exactly(tiny_cfg, tmp_path):
    overrides = [
        "pipeline.order=[sft_fast,sft_reasoning]",
        "curriculum=competence",
        "curriculum/scorer=student_loss",
        "++pipeline.stages.sft_reasoning.checkpoint_every_n_steps=2",
    ]
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    payload = train(tiny_cfg(*overrides, run_dir=reference_dir))
    scores = json.loads((reference_dir / "02_sft_reasoning" / "scores" / "student_loss.json").read_text())
    assert len(scores) == payload["stages"][1]["metrics"]["train_examples"]
    settings = json.loads((reference_dir / "02_sft_reasoning" / "metrics.json").read_text())["settings"]
    assert settings["curriculum"]["scorer"]["name"] == "student_loss"

    marker = tmp_path / "crashed.marker"
    crash = (
        f"+callbacks.crash={{_target_: tests.helpers.CrashAt, stage: 02_sft_reasoning, step: 3, marker: '{marker}'}}"
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*overrides, crash, run_dir=crashed_dir))
    train(tiny_cfg(f"resume={crashed_dir}"))  # the resumed model has trained: only the cached scores match
    assert json.loads((crashed_dir / "02_sft_reasoning" / "scores" / "student_loss.json").read_text()) == scores
    resumed = load_file(crashed_dir / "02_sft_reasoning" / "export" / "model.safetensors")
    reference = load_file(reference_dir / "02_sft_reasoning" / "export" / "model.safetensors")
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6), key


def test_teacher_scorer_without_a_store_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match="reads the teacher store"):
        train(
            tiny_cfg("pipeline.order=[sft_reasoning]", "+pipeline.stages.sft_reasoning.curriculum.scorer=teacher_nll")
        )
