"""Multiruns as users launch them: Hydra's basic sweeper, the Optuna search, the submitit launchers; and, in process,
a job waiting on a store another job is scoring, and wandb state between jobs.

The multirun tests run ``kdpipe-train -m`` in a subprocess at tiny size. Hydra's ``PickleJobInfoCallback`` pickles
each job's return value (what a sweeper optimises) into ``<job>/.hydra/job_return.pickle``, so the tests can
compare it with the job's ``results.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from kdpipe.cli.train import final_metric, train
from kdpipe.utils.claim import SharedLock
from tests.helpers import cli_env, run_cli, store_of

PICKLE_RETURNS = "+hydra.callbacks.job_info._target_=hydra.experimental.callbacks.PickleJobInfoCallback"


def sweep_jobs(root: Path) -> list[Path]:
    """The numbered job folders of the one multirun under ``root``."""
    sweeps = list((root / "logs" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    return sorted((p for p in sweeps[0].iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def job_return(job: Path):
    with open(job / ".hydra" / "job_return.pickle", "rb") as f:
        return pickle.load(f).return_value


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


def stage(payload: dict, name: str) -> dict:
    (found,) = [s for s in payload["stages"] if s["name"] == name]
    return found


def stage_file(job: Path, payload: dict, name: str) -> dict:
    """A stage's ``metrics.json`` (its metrics, the artifacts it wrote or read, its settings)."""
    return json.loads((job / stage(payload, name)["dir"] / "metrics.json").read_text())


# --- a store another job is scoring ----------------------------------------------------------------------------


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_a_job_waits_for_another_job_scoring_the_same_store_then_reuses_it(tiny_cfg, tmp_path, one_thread):
    """The score stage takes the same lock on its store: while another job holds it, this job waits instead of
    scoring the store a second time, then reuses the store that job finished."""
    share = ["pipeline.stages.teacher_sft.share=true", "pipeline.stages.teacher_sft.seed=5"]
    order = "pipeline.order=[teacher_sft,score]"
    first = train(tiny_cfg(order, *share, run_dir=tmp_path / "a"))
    store = store_of(first, "score", "reasoning")
    finished = tmp_path / "finished_store"
    shutil.move(store, finished)  # as if the other job had not written it yet
    other_job = SharedLock(store)
    assert other_job.try_acquire()  # the other job is scoring it
    result: dict = {}

    def second_job() -> None:
        result["run"] = train(tiny_cfg(order, *share, run_dir=tmp_path / "b"))

    second = threading.Thread(target=second_job)
    second.start()
    for _ in range(600):  # until the second job is blocked at the lock (it reuses the teacher first)
        if second.is_alive() and not store.exists() and (tmp_path / "b" / "02_score").exists():
            break
        time.sleep(0.05)
    time.sleep(1.0)
    assert second.is_alive() and not store.exists()  # waiting, not scoring
    shutil.move(finished, store)  # the other job finishes its store ...
    other_job.release()  # ... and lets go
    second.join(timeout=120)
    assert result["run"].result("score").metrics["reasoning_store"]["reused"] is True
    assert store_of(result["run"], "score", "reasoning") == store


# --- wandb -----------------------------------------------------------------------------------------------------


def test_a_wandb_stage_leaves_no_wandb_state_to_the_next_job(tiny_cfg, tmp_path, monkeypatch, one_thread):
    import wandb

    for key, value in cli_env(tmp_path).items():
        if key.startswith("WANDB_"):  # wandb's own folders in the test's tmp dir, quiet
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(tiny_cfg("logger=wandb", "pipeline.order=[sft_fast]"))
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
    assert "WANDB_MODE" not in os.environ  # WandbLogger(offline=True) had set it for the rest of the process
    assert wandb.run is None
    # the next job's wandb run reads its own mode (wandb's process-wide settings were torn down)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = wandb.init(project="kdpipe-test")
    try:
        assert run.disabled
    finally:
        wandb.finish()


# --- multiruns through kdpipe-train ------------------------------------------------------------------------------


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_multirun_over_stage_orders_shares_one_teacher_and_store_and_finishes_wandb(tiny_cfg, tmp_path):
    """Two stage orders (the presets sft_r_sft_f_kd_f and alternation, each after a teacher stage) in one
    basic-sweeper multirun with the (offline) wandb logger: the first job trains and scores the teacher, the
    second reuses both; every training stage of every job has its own finished run."""
    args = tiny_cfg.args(
        "logger=wandb",
        "pipeline.stages.teacher_sft.share=true",
        "pipeline.order=[teacher_sft,score,sft_reasoning,sft_fast,kd_fast],"
        "[teacher_sft,score,sft_reasoning,kd_reasoning,sft_fast,kd_fast]",
        PICKLE_RETURNS,
    )
    run_cli("kdpipe-train", "-m", *args, cwd=tmp_path)
    jobs = sweep_jobs(tmp_path)
    assert len(jobs) == 2
    first, second = results(jobs[0]), results(jobs[1])
    assert [s["name"] for s in first["stages"]][-1] == [s["name"] for s in second["stages"]][-1] == "kd_fast"
    assert "kd_reasoning" in [s["name"] for s in second["stages"]]  # the second job ran the other preset
    for job, payload in zip(jobs, (first, second)):
        value = job_return(job)
        assert isinstance(value, float) and value == final_metric(payload, "accuracy")

    # the teacher: trained by the first job, reused by the second
    shared = stage(first, "teacher_sft")["metrics"]["shared_to"]
    assert stage(second, "teacher_sft")["metrics"]["shared_from"] == shared
    assert not (jobs[1] / "01_teacher_sft" / "export").exists()
    shared_files = sorted(p.name for p in (tmp_path / "logs" / "shared").iterdir())
    assert shared_files == [f".{Path(shared).name}.lock", Path(shared).name]  # the lock stays; no temp folders
    # its stores: scored by the first job, found (same path, not rewritten) by the second
    scored, found = stage(first, "score")["metrics"], stage(second, "score")["metrics"]
    stores = [
        {s["style"]: Path(s["path"]) for s in stage_file(job, payload, "score")["artifacts"]["stores"]}
        for job, payload in zip(jobs, (first, second))
    ]
    started_second = (jobs[1] / ".hydra" / "config.yaml").stat().st_mtime
    for style in ("reasoning", "fast"):
        assert not scored[f"{style}_store"]["reused"] and found[f"{style}_store"]["reused"]
        store = stores[1][style]
        assert store == stores[0][style] and found[f"{style}_store"]["name"] == store.name
        assert all(f.stat().st_mtime < started_second for f in store.iterdir())
    assert len([p for p in (tmp_path / "logs" / "stores").iterdir() if not p.name.startswith(".")]) == 2  # + locks

    # wandb: one finished offline run per stage each job ran (training and score stages; a stage shared from
    # another job runs nothing), none carried over from the first job, each with its job's sweep overrides
    run_ids = set()
    for number, (job, payload) in enumerate(zip(jobs, (first, second))):
        ran = [s for s in payload["stages"] if "shared_from" not in s["metrics"]]
        runs = sorted((job / "wandb").glob("offline-run-*"))
        assert len(runs) == len(ran) == 5
        for run in runs:
            assert "finishing run" in (run / "logs" / "debug.log").read_text()
            run_ids.add(run.name.split("-", 3)[-1])
            sweep = yaml.safe_load((run / "files" / "config.yaml").read_text())["sweep"]["value"]
            order = ("sft_fast,kd_fast]", "kd_reasoning,sft_fast,kd_fast]")[number]
            swept = [o for o in sweep["overrides"] if o.startswith("pipeline.order=")]
            assert sweep["job_num"] == number and len(swept) == 1 and swept[0].endswith(order)
    assert len(run_ids) == 10


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_optuna_sweep_runs_two_trials_in_memory(tiny_cfg, tmp_path):
    """Two trials of hparams_search=kd_optuna. Tiny models answer nothing right (accuracy 0 in every trial), so
    the test optimises the final evaluation loss instead: distinct per trial, it shows which trial won."""
    args = tiny_cfg.args(
        "hparams_search=kd_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "optimized_metric=loss",
        "hydra.sweeper.direction=minimize",
        PICKLE_RETURNS,
    )
    run_cli("kdpipe-train", "-m", *args, cwd=tmp_path)
    jobs = sweep_jobs(tmp_path)
    assert len(jobs) == 2
    best = yaml.safe_load((jobs[0].parent / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    losses, params = [], []
    for job in jobs:
        payload = results(job)
        losses.append(final_metric(payload, "loss"))
        assert job_return(job) == losses[-1]
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        trial = {k: v for k, v in overrides.items() if k.startswith("pipeline.stages.")}
        assert len(trial) == 6
        params.append(trial)
        # the trial's values reached the KD stage that trained (its saved settings) and the score stage
        kd = json.loads((job / "05_kd_fast" / "metrics.json").read_text())["settings"]
        assert kd["loss"]["divergence"] == trial["pipeline.stages.kd_fast.loss.divergence"]
        assert kd["loss"]["ce_weight"] == pytest.approx(float(trial["pipeline.stages.kd_fast.loss.ce_weight"]))
        assert kd["optimizer"]["lr"] == pytest.approx(float(trial["pipeline.stages.kd_fast.optimizer.lr"]))
        read = stage_file(job, payload, "kd_fast")["artifacts"]["reads"]["store"]
        assert f"-k{trial['pipeline.stages.score.k']}-" in Path(read).name
    assert params[0] != params[1] and losses[0] != losses[1]
    winner = losses.index(min(losses))
    assert best["best_value"] == pytest.approx(losses[winner])
    assert {k: str(v) for k, v in best["best_params"].items()} == params[winner]
    # the teacher is trained by the first trial only
    assert "shared_from" in stage(results(jobs[1]), "teacher_sft")["metrics"]


@pytest.mark.slow  # ~27 s of a real submitit job: make test-all
def test_submitit_local_launcher_runs_a_job_in_its_own_process(tiny_cfg, tmp_path):
    args = tiny_cfg.args("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "pipeline.order=[sft_fast]")
    run_cli("kdpipe-train", "-m", *args, cwd=tmp_path)
    (job,) = sweep_jobs(tmp_path)
    payload = results(job)
    assert [s["status"] for s in payload["stages"]] == ["done"]
    value = final_metric(payload, "accuracy")
    assert value is not None
    # submitit ran it in another process: the job's log, and the result it sent back to the launcher (the job's
    # return value; Hydra's PickleJobInfoCallback cannot pickle a submitit job's config, so it is not used here)
    (submitit_dir,) = (p for p in (job.parent / ".submitit").iterdir() if any(p.iterdir()))
    with open(next(submitit_dir.glob("*_result.pkl")), "rb") as f:
        status, returned = pickle.load(f)
    assert status == "success" and returned.return_value == value
    log = next(submitit_dir.glob("*_log.out")).read_text()
    assert "stage 01_sft_fast" in log and "Exiting after successful completion" in log


@pytest.mark.slow
def test_an_optuna_study_in_sqlite_continues_across_sweeps(tiny_cfg, tmp_path):
    """A study in a database (optuna 2 on SQLAlchemy < 2) gets the trials of every sweep that names it."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for seed in (1, 2):  # a new sampler seed per sweep, as the config advises
        args = tiny_cfg.args(
            "hparams_search=kd_optuna",
            "pipeline.order=[teacher_sft,score,kd_fast]",
            "hydra.sweeper.n_trials=1",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.sampler.seed={seed}",
            f"hydra.sweep.dir={tmp_path}/sweep{seed}",
        )
        run_cli("kdpipe-train", *args, cwd=tmp_path)
    trials = optuna.load_study(study_name="kd_optuna", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].params != trials[1].params
    for seed, trial in zip((1, 2), trials):
        payload = results(tmp_path / f"sweep{seed}" / "0")
        assert trial.value == final_metric(payload, "accuracy")
    best = yaml.safe_load((tmp_path / "sweep2" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t.value for t in trials)  # over the whole study, not this sweep's trial
