"""The console scripts as a user runs them: kdpipe-train, kdpipe-eval and kdpipe-score in subprocesses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import TinyConfig, run_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny pipeline run through the real entry point, with the default (offline wandb) logger."""
    root = tmp_path_factory.mktemp("cli")
    args = TinyConfig(root).args("logger=wandb", "pipeline.order=[teacher_sft,sft_fast]")
    run_cli("kdpipe-train", *args, cwd=root)
    runs = list((root / "logs" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_train_cli_prints_table_and_writes_offline_wandb(trained_run):
    assert (trained_run / "results.md").exists()
    offline = list((trained_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2  # one wandb run per training stage, nothing sent
    assert (trained_run / ".hydra" / "config.yaml").exists()


def test_eval_cli_evaluates_a_stage_export(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    export = trained_run / "02_sft_fast" / "export"
    run_cli("kdpipe-eval", f"model_path={export}", "limit=15", "style=reasoning", f"output={out}", cwd=tmp_path)
    written = json.loads(out.read_text())
    metrics = written["metrics"]
    assert metrics["num_examples"] == 15 and written["style"] == "reasoning"  # the command's keys over the run's
    assert written["data"]["source"] == "arith" and written["metric"] == "answer_match(answer_colon)"
    assert {"accuracy", "accuracy_by_level", "mean_response_tokens", "loss", "perplexity"} <= set(metrics)
    assert out.with_suffix(".jsonl").exists()


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_train_cli_bad_input_exits_with_a_clear_message(tiny_cfg, tmp_path):
    proc = run_cli("kdpipe-train", *tiny_cfg.args("pipeline.order=[nope]"), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "unknown stage 'nope'" in proc.stderr
    proc = run_cli("kdpipe-train", *tiny_cfg.args(f"resume={tmp_path / 'missing'}"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_eval_cli_missing_model_dir(tmp_path):
    proc = run_cli("kdpipe-eval", f"model_path={tmp_path / 'none'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_score_cli_scores_a_teacher_export_and_the_old_name_reuses_the_store(trained_run, tmp_path):
    teacher = trained_run / "01_teacher_sft" / "export"
    args = [f"teacher_path={teacher}", "data.n_train_per_level=5", "k=8", "styles=[fast]"]
    args.append(f"store_root={tmp_path / 'stores'}")
    first = run_cli("kdpipe-score", *args, cwd=tmp_path)
    stores = [p for p in (tmp_path / "stores").iterdir() if not p.name.startswith(".")]  # not the lock file
    assert len(stores) == 1 and (stores[0] / "manifest.json").exists()
    assert re.search(r"scoring \d+ examples into", first.stdout)
    written = {p.name: p.stat().st_mtime_ns for p in stores[0].iterdir()}
    again = run_cli("kdpipe-cache", *args, cwd=tmp_path)  # the old name, for one release
    assert "kdpipe-cache is now kdpipe-score" in again.stderr
    assert "reusing teacher store" in again.stdout and "scoring" not in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in stores[0].iterdir()} == written  # reused, not rewritten
    missing = run_cli("kdpipe-score", f"teacher_path={tmp_path / 'nope'}", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "not a directory" in missing.stderr


def printed_jobs(stdout: str) -> list[tuple[str, dict]]:
    """``kdpipe-train -m ... --cfg job``'s output: (the job's overrides, its config) for every job."""
    parts = re.split(r"^# job \d+: ?(.*)$", stdout, flags=re.MULTILINE)
    return [(overrides, yaml.safe_load(config)) for overrides, config in zip(parts[1::2], parts[2::2])]


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_a_sweep_with_cfg_job_prints_the_config_of_every_job(tmp_path):
    proc = run_cli("kdpipe-train", "-m", "pipeline.stages.kd_fast.loss.ce_weight=0,0.5", "--cfg", "job", cwd=tmp_path)
    jobs = printed_jobs(proc.stdout)
    assert [overrides for overrides, _ in jobs] == [
        "pipeline.stages.kd_fast.loss.ce_weight=0",
        "pipeline.stages.kd_fast.loss.ce_weight=0.5",
    ]
    assert [cfg["pipeline"]["stages"]["kd_fast"]["loss"]["ce_weight"] for _, cfg in jobs] == [0, 0.5]
    assert all(cfg["pipeline"]["stages"]["kd_fast"]["loss"]["divergence"] == "fkl" for _, cfg in jobs)
    assert all("hydra" not in cfg for _, cfg in jobs)  # job: the job's config only
    assert not (tmp_path / "logs").exists()  # printed, nothing run


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_the_optuna_search_config_composes_with_cfg_job(tmp_path):
    proc = run_cli("kdpipe-train", "hparams_search=kd_optuna", "--cfg", "job", cwd=tmp_path)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["optimized_metric"] == "accuracy"
    assert cfg["pipeline"]["stages"]["teacher_sft"]["share"] is True
    assert not (tmp_path / "logs").exists()
