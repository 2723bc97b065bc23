"""The stage pipeline end to end on tiny models: outputs, resume after a crash, and bad input found while running.
(Bad input refused before any stage: tests/unit/pipeline/test_spec.py.)"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdpipe.cli.train import train
from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS
from kdpipe.pipeline.state import PipelineState
from tests.helpers import assert_same_weights, cli_env, crash_override, store_of


def test_tiny_pipeline_writes_every_output(tiny_cfg, tmp_path):
    started = time.perf_counter()
    cfg = tiny_cfg()
    run_result = train(cfg)
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
    score_file = json.loads((run / "02_score" / "metrics.json").read_text())
    score = score_file["metrics"]
    stores = run_result.result("score").stores
    assert {(s.style, s.sequences) for s in stores} == {("reasoning", "labels"), ("fast", "labels")}
    assert "stores" not in score  # artifacts are not metrics: in the typed result and metrics.json's artifacts
    assert score_file["artifacts"]["stores"] == [
        {"style": s.style, "sequences": s.sequences, "path": str(s.path)} for s in stores
    ]
    assert all(score[f"{s.style}_store"]["name"] == s.path.name for s in stores)
    # k=8 here: per-row fields and shard headers weigh more than at k=64 (the codec tests check 3 bytes there)
    assert not score["fast_store"]["reused"] and score["fast_store"]["bytes_per_entry"] < 5
    assert json.loads((run / "06_eval_student" / "metrics.json").read_text())["metrics"]["num_examples"] == 20
    results = json.loads((run / "results.json").read_text())
    assert results == json.loads(json.dumps(run_result.results))
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
    assert state["version"] == 2 and all(s["status"] == "done" for s in state["stages"])
    exports = {s["name"]: s["result"]["export"] for s in state["stages"]}
    assert exports["teacher_sft"] == "01_teacher_sft/export" and exports["kd_fast"] == "05_kd_fast/export"
    loaded = PipelineState.load(run, resolve_stages(cfg, set(STAGE_KINDS)))
    assert loaded.model_path("teacher") == run / "01_teacher_sft" / "export"
    assert loaded.model_path("student") == run / "05_kd_fast" / "export"
    assert loaded.stores == {(s.style, s.sequences, None): s.path for s in stores}
    assert run_result.result("kd_fast").reads == {"store": str(store_of(run_result, "score", "fast"))}
    assert (run / "config.yaml").exists() and (run / "config_tree.log").exists()
    # the eval stage evaluated the export of the student's last training stage
    generations = (run / "05_kd_fast" / "generations.jsonl").read_text()
    assert generations == (run / "06_eval_student" / "generations.jsonl").read_text()


def test_a_second_run_reuses_the_teacher_store_instead_of_rescoring(tiny_cfg, tmp_path):
    order = "pipeline.order=[teacher_sft,score,kd_fast]"
    first_run = train(tiny_cfg(order, run_dir=tmp_path / "first"))
    first = json.loads((tmp_path / "first" / "02_score" / "metrics.json").read_text())["metrics"]
    second_run = train(tiny_cfg(order, run_dir=tmp_path / "second"))
    second = json.loads((tmp_path / "second" / "02_score" / "metrics.json").read_text())["metrics"]
    # the same teacher, data, k and T: the same store
    assert second_run.result("score").stores == first_run.result("score").stores
    assert second["fast_store"]["name"] == first["fast_store"]["name"]
    assert second["fast_store"]["reused"] and second["reasoning_store"]["reused"]


def test_kd_without_a_store_is_refused_before_any_stage(tiny_cfg, tmp_path):
    with pytest.raises(PipelineConfigError, match=r"reads a teacher store of its label sequences .* `score` stage"):
        train(tiny_cfg("pipeline.order=[sft_fast,kd_fast]"))
    assert not (tmp_path / "run" / "01_sft_fast").exists()


def test_each_stage_starts_from_the_previous_stage_of_its_model(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "pipeline.order=[sft_reasoning,teacher_sft,sft_fast]",
        "pipeline.stages.sft_fast.max_steps=1",
        "pipeline.stages.sft_fast.optimizer.lr=1e-12",  # one step that barely moves the weights
    )
    train(cfg)
    run = tmp_path / "run"
    assert_same_weights(run / "01_sft_reasoning" / "export", run / "03_sft_fast" / "export")


def test_interrupted_stage_resumes_and_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    order = "pipeline.order=[teacher_sft,score,kd_fast]"
    reference_dir = tmp_path / "reference"
    train(tiny_cfg(order, run_dir=reference_dir))

    crashed_dir = tmp_path / "crashed"
    crash = crash_override("03_kd_fast", 4, tmp_path / "crashed.marker")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(order, crash, run_dir=crashed_dir))
    state = json.loads((crashed_dir / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done", "running"]
    ckpt = torch.load(crashed_dir / "03_kd_fast" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3  # the checkpoint before the crash
    teacher_mtime = (crashed_dir / "01_teacher_sft" / "export" / "model.safetensors").stat().st_mtime

    resumed_run = train(tiny_cfg(f"resume={crashed_dir}"))
    assert [s["status"] for s in resumed_run.results["stages"]] == ["done", "done", "done"]
    # the finished stage was skipped, not redone
    assert (crashed_dir / "01_teacher_sft" / "export" / "model.safetensors").stat().st_mtime == teacher_mtime
    # the resumed stage saw the same batches from the same state: identical weights
    assert_same_weights(reference_dir / "03_kd_fast" / "export", crashed_dir / "03_kd_fast" / "export")


@pytest.mark.parametrize("crash_step", [3, 5])  # checkpoints every 2 steps: resume before and after validation
def test_a_stage_resumed_mid_epoch_runs_the_rest_of_its_plan(tiny_cfg, tmp_path, crash_step):
    overrides = ["pipeline.order=[sft_reasoning]", "pipeline.stages.sft_reasoning.checkpoint_every_n_steps=2"]
    train(tiny_cfg(*overrides, run_dir=tmp_path / "reference"))
    crash = crash_override("sft_reasoning", crash_step, tmp_path / "crashed.marker")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*overrides, crash, run_dir=tmp_path / "crashed"))
    resumed_run = train(tiny_cfg(f"resume={tmp_path / 'crashed'}"))
    # all of max_steps, not the plan minus the skipped part
    assert resumed_run.result("sft_reasoning").metrics["steps"] == 8
    stage = "01_sft_reasoning"
    assert_same_weights(tmp_path / "reference" / stage / "export", tmp_path / "crashed" / stage / "export")


def test_existing_run_directory_is_not_overwritten(tiny_cfg):
    train(tiny_cfg("pipeline.order=[eval_student]"))
    with pytest.raises(PipelineConfigError, match="already holds a run"):
        train(tiny_cfg("pipeline.order=[eval_student]"))


def test_a_pretrained_teacher_export_is_loaded_with_its_own_tokenizer(tiny_cfg, tmp_path):
    train(tiny_cfg("pipeline.order=[teacher_sft]", run_dir=tmp_path / "teacher"))
    export = tmp_path / "teacher" / "01_teacher_sft" / "export"
    cfg = tiny_cfg(
        "models.teacher.source=pretrained",
        f"models.teacher.path={export}",
        "models.teacher.tokenizer=null",  # the export's own (char: the built-in one)
        "pipeline.order=[score,kd_fast]",
        run_dir=tmp_path / "reuse",
    )
    store = store_of(train(cfg), "score", "fast")
    manifest = json.loads((store / "manifest.json").read_text())
    trained = load_file(export / "model.safetensors")
    assert manifest["teacher"]["weights_sha256"]  # fingerprinted from the loaded export
    assert manifest["tokenizer"]["vocab_size"] == trained["model.embed_tokens.weight"].shape[0]


def assert_generations_sample(sample: Path, generations: Path, rows: int) -> None:
    """A logger's ``generations_sample.jsonl``: the first ``rows`` records of the stage's generations, every
    key present and every value a string."""
    first = [json.loads(line) for line in generations.read_text().splitlines()[:rows]]
    logged = [json.loads(line) for line in sample.read_text().splitlines()]
    assert len(logged) == rows and [r["id"] for r in logged] == [r["id"] for r in first]
    assert all(set(r) == set(first[0]) and all(isinstance(v, str) for v in r.values()) for r in logged)


@pytest.mark.parametrize("logger", ["tensorboard", "csv", "none"])
def test_each_logger_writes_where_documented(tiny_cfg, tmp_path, logger):
    sample = [] if logger == "none" else [f"logger.{logger}.generations_sample=5"]
    train(tiny_cfg(f"logger={logger}", "pipeline.order=[sft_fast]", *sample))
    stage = tmp_path / "run" / "01_sft_fast"
    logs = stage / "logs"
    if logger == "tensorboard":
        assert list(logs.glob("tensorboard/events.out.tfevents.*"))
        assert_generations_sample(logs / "tensorboard" / "generations_sample.jsonl", stage / "generations.jsonl", 5)
    elif logger == "csv":
        logged = (logs / "csv" / "metrics.csv").read_text()
        assert "train/loss" in logged
        # what it scored, beside the losses: the evaluation under eval/, the stage's other final metrics under stage/
        assert "eval/accuracy" in logged and "eval/accuracy_by_level/1" in logged and "eval/loss" in logged
        assert "stage/steps" in logged and "stage/accuracy" not in logged
        assert_generations_sample(logs / "csv" / "generations_sample.jsonl", stage / "generations.jsonl", 5)
        # and what was run: settings, model, data and seed as the run's hyperparameters; the evaluation's strings
        hparams = yaml.safe_load((logs / "csv" / "hparams.yaml").read_text())
        assert hparams["stage"]["name"] == "sft_fast" and hparams["settings"]["max_steps"] == 6
        assert hparams["model"]["arch"]["hidden_size"] and hparams["data"]["source"] == "arith"
        assert hparams["eval"]["eval_split"] == "test" and "sweep" not in hparams  # no multirun here
    else:
        assert not logs.exists()
    assert (tmp_path / "run" / "results.json").exists()


def test_an_eval_stage_logs_its_config_evaluation_and_generations(tiny_cfg, tmp_path):
    train(tiny_cfg("pipeline.order=[eval_student]"))
    logs = tmp_path / "run" / "01_eval_student" / "logs" / "csv"
    logged = (logs / "metrics.csv").read_text()
    assert "eval/accuracy" in logged and "eval/mean_response_tokens" in logged and "stage/parameters" in logged
    assert yaml.safe_load((logs / "hparams.yaml").read_text())["stage"]["kind"] == "eval"
    assert (logs / "generations_sample.jsonl").exists()


def test_wandb_offline_run_holds_config_and_summary_and_prints_one_line(tiny_cfg, tmp_path, monkeypatch, capfd):
    for key, value in cli_env(tmp_path).items():
        if key.startswith("WANDB_"):  # wandb's own folders in the test's tmp dir
            monkeypatch.setenv(key, value)
    for key in ("WANDB_MODE", "WANDB_SILENT", "WANDB_CONSOLE"):  # the logger config's own quiet, not the test's
        monkeypatch.delenv(key, raising=False)
    train(tiny_cfg("logger=wandb", "pipeline.order=[sft_fast]"))
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("wandb")]  # wandb's prefix too
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*-01_sft_fast")
    assert lines == [f"wandb: offline run in {run}; upload it with: wandb sync {run}"]  # the stage's one line
    assert not any(key in os.environ for key in ("WANDB_MODE", "WANDB_SILENT", "WANDB_CONSOLE"))  # put back
    config = yaml.safe_load((run / "files" / "config.yaml").read_text())
    assert config["stage"]["value"]["name"] == "sft_fast" and config["settings"]["value"]["max_steps"] == 6
    assert config["eval"]["value"]["eval_split"] == "test"  # the evaluation's strings, beside the settings
    summary = json.loads((run / "files" / "wandb-summary.json").read_text())
    assert isinstance(summary["eval/accuracy"], int | float) and "stage/steps" in summary
    assert "stage/accuracy" not in summary and "train/loss" in summary
    assert summary["eval/generations"]["_type"] == "table-file" and summary["eval/generations"]["nrows"] == 20


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_a_stage_can_order_its_data_by_teacher_nll_from_the_store(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "pipeline.order=[teacher_sft,score,sft_reasoning,sft_fast]",
        "+pipeline.stages.sft_reasoning.curriculum.scorer=teacher_nll",
        "pipeline.stages.sft_reasoning.curriculum.schedule=sorted",
    )
    store = store_of(train(cfg), "score", "reasoning")
    assert (store / "scores" / "teacher_nll.json").exists()  # computed once, cached beside the store
    settings = json.loads((tmp_path / "run" / "03_sft_reasoning" / "metrics.json").read_text())["settings"]
    assert settings["curriculum"]["scorer"] == "teacher_nll"
    fast = json.loads((tmp_path / "run" / "04_sft_fast" / "metrics.json").read_text())["settings"]
    assert fast["curriculum"]["scorer"] == {"name": "level"}  # the other stages keep the default


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_student_loss_curriculum_scores_with_the_stage_start_model_and_resumes_exactly(tiny_cfg, tmp_path):
    overrides = [
        "pipeline.order=[sft_fast,sft_reasoning]",
        "curriculum=competence",
        "curriculum/scorer=student_loss",
        "pipeline.stages.sft_reasoning.checkpoint_every_n_steps=2",
    ]
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    reference_run = train(tiny_cfg(*overrides, run_dir=reference_dir))
    scores = json.loads((reference_dir / "02_sft_reasoning" / "scores" / "student_loss.json").read_text())
    assert len(scores) == reference_run.result("sft_reasoning").metrics["train_examples"]
    settings = json.loads((reference_dir / "02_sft_reasoning" / "metrics.json").read_text())["settings"]
    assert settings["curriculum"]["scorer"]["name"] == "student_loss"

    crash = crash_override("02_sft_reasoning", 3, tmp_path / "crashed.marker")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*overrides, crash, run_dir=crashed_dir))
    train(tiny_cfg(f"resume={crashed_dir}"))  # the resumed model has trained: only the cached scores match
    assert json.loads((crashed_dir / "02_sft_reasoning" / "scores" / "student_loss.json").read_text()) == scores
    assert_same_weights(reference_dir / "02_sft_reasoning" / "export", crashed_dir / "02_sft_reasoning" / "export")


def test_teacher_scorer_without_a_store_is_refused(tiny_cfg):
    with pytest.raises(PipelineConfigError, match="its curriculum scorer reads a teacher store"):
        train(
            tiny_cfg("pipeline.order=[sft_reasoning]", "+pipeline.stages.sft_reasoning.curriculum.scorer=teacher_nll")
        )


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_a_kd_stage_reads_its_store_at_a_smaller_k_and_another_temperature(tiny_cfg, tmp_path):
    """teacher_k / teacher_temperature: the same capture read post hoc, no second score stage."""
    score_k = int(tiny_cfg().pipeline.stages.score.k)
    cfg = tiny_cfg(
        f"pipeline.stages.kd_fast.teacher_k={score_k // 2}",
        "pipeline.stages.kd_fast.teacher_temperature=2.0",
        "pipeline.stages.kd_fast.loss.temperature=2.0",
    )
    train(cfg)
    kd = json.loads((tmp_path / "run" / "05_kd_fast" / "metrics.json").read_text())["metrics"]
    assert kd["teacher_k"] == score_k // 2 and kd["teacher_temperature"] == 2.0
    assert 0.0 < kd["kd_teacher_topk_mass"] < 1.0 and math.isfinite(kd["train_divergence"])


def test_a_stage_with_its_own_data_keys_reads_its_own_data_and_the_others_the_runs(tiny_cfg, tmp_path):
    """``pipeline.stages.<name>.data``: merged over the top-level data for that stage only (a teacher trained
    on more, cleaner problems than the student's), and part of a shared stage's identity."""
    base = tiny_cfg("pipeline.order=[sft_fast]")
    more = int(base.data.n_train_per_level) * 2
    # on the command line a stage's data keys are new keys (`+`); in a config file they are written as usual
    own = [f"+pipeline.stages.teacher_sft.data.n_train_per_level={more}", "pipeline.order=[teacher_sft,sft_fast]"]
    done = train(tiny_cfg(*own, "+pipeline.stages.teacher_sft.data.label_noise.rate=0.0",
                          "pipeline.stages.teacher_sft.share=true"))  # fmt: skip
    teacher, student = done.result("teacher_sft").metrics, done.result("sft_fast").metrics
    assert teacher["train_examples"] > student["train_examples"]
    identity = json.loads(next(tmp_path.rglob("shared/teacher_sft-*/identity.json")).read_text())
    assert identity["data"]["n_train_per_level"] == more and identity["data"]["label_noise"]["rate"] == 0.0
    with pytest.raises(PipelineConfigError, match=r"pipeline.stages.teacher_sft.data.n_train_per_levl"):
        train(tiny_cfg("+pipeline.stages.teacher_sft.data.n_train_per_levl=3", run_dir=tmp_path / "typo"))
