"""Multiruns as users launch them: Hydra's basic sweeper, the Optuna search, the submitit launchers.

The CLI tests run ``kdpipe-train -m`` in a subprocess at tiny size. Hydra's ``PickleJobInfoCallback`` pickles
each job's return value (what a sweeper optimises) into ``<job>/.hydra/job_return.pickle``, so the tests can
compare it with the job's ``results.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdpipe.pipeline.sharing import SharedLock, claim_shared, find_shared, publish_shared, shared_dir
from kdpipe.errors import PipelineConfigError, resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS, StageContext
from kdpipe.cli.train import final_metric, train
from kdpipe.utils.paths import config_dir

BIN = Path(sys.executable).parent
PICKLE_RETURNS = "+hydra.callbacks.job_info._target_=hydra.experimental.callbacks.PickleJobInfoCallback"
TINY_CLI = ["debug=fast", "callbacks=none", "print_config=false"]


def wandb_env(root: Path) -> dict:
    """wandb's own folders (settings, cache, artifacts) inside the test's tmp dir, offline, quiet."""
    return {
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),
        "WANDB_SILENT": "true",
    }


def run_cli(args: list[str], root: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, **wandb_env(root), "KDPIPE_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [str(BIN / "kdpipe-train"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


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


def compose_with_hydra(overrides: list[str]):
    """The full config, ``hydra`` node included (sweeper, launcher), as a multirun would compose it."""
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


# --- configs ---------------------------------------------------------------------------------------------------


def test_kd_optuna_searches_the_kd_settings_and_maximises_accuracy(tmp_path):
    cfg = compose_with_hydra(["hparams_search=kd_optuna", f"paths.root_dir={tmp_path}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric == "accuracy" and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert sweeper.storage is None and sweeper.n_trials >= 1 and sweeper.n_jobs >= 1
    searched = {key.rsplit(".", 1)[-1] for key in sweeper.params}
    assert searched == {"ce_weight", "temperature", "divergence", "beta", "k", "lr"}
    for key in sweeper.params:  # every searched key exists, so Optuna's overrides apply without `+`
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key

    # one trial's values reach every KD stage of the default pipeline, and the score stage's k
    trial = {
        "pipeline.stages.kd_fast.loss.ce_weight": 0.25,
        "pipeline.stages.kd_fast.loss.temperature": 1.5,
        "pipeline.stages.kd_fast.loss.divergence": "jsd",
        "pipeline.stages.kd_fast.loss.beta": 0.3,
        "pipeline.stages.score.k": 8,
        "pipeline.stages.kd_fast.optimizer.lr": 1.0e-3,
    }
    overrides = [f"{k}={v}" for k, v in trial.items()]
    cfg = compose_with_hydra(["hparams_search=kd_optuna", f"paths.root_dir={tmp_path}", *overrides])
    specs = {s.name: s.config for s in resolve_stages(cfg, set(STAGE_KINDS))}
    assert [n for n, s in specs.items() if s.kind == "kd"] == ["kd_reasoning", "kd_fast"]
    for name in ("kd_reasoning", "kd_fast"):
        loss = specs[name].loss
        assert (loss.ce_weight, loss.temperature, loss.divergence, loss.beta) == (0.25, 1.5, "jsd", 0.3)
        assert specs[name].optimizer.lr == 1.0e-3
        assert specs[name].loss.tail == "bucket"  # the keys not searched keep the KD defaults
    assert specs["score"].k == 8
    # the teacher and the SFT stages keep the global rate, so they are the same (and shared) in every trial
    assert specs["teacher_sft"].optimizer.lr == cfg.optimizer.lr != 1.0e-3
    assert specs["teacher_sft"].share and specs["sft_reasoning"].share


def test_kd_optuna_without_overrides_keeps_the_kd_defaults():
    plain = {s.name: s.config for s in resolve_stages(compose_with_hydra([]), set(STAGE_KINDS))}
    cfg = compose_with_hydra(["hparams_search=kd_optuna"])
    searched = {s.name: s.config for s in resolve_stages(cfg, set(STAGE_KINDS))}
    for name in ("kd_reasoning", "kd_fast", "score"):
        assert searched[name] == plain[name]


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")  # see the config's header
def test_submitit_slurm_config_exposes_the_cluster_keys(tmp_path, monkeypatch):
    import hydra
    import submitit

    cfg = compose_with_hydra(
        [
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=myproj",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.timeout_min=240",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ]
    )
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher_cfg["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher_cfg["partition"], launcher_cfg["account"], launcher_cfg["timeout_min"]) == ("gpu", "myproj", 240)
    assert launcher_cfg["gpus_per_node"] == launcher_cfg["tasks_per_node"] == 4  # one task per GPU (Lightning)
    assert {"nodes", "cpus_per_task", "mem_gb", "qos", "setup", "additional_parameters"} <= set(launcher_cfg)

    # the plugin's own launch() with these keys, stopped before anything is submitted: submitit accepts every
    # key, and the sbatch script it would run asks for what the config says
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    executors = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, fn, *args: executors.append(self) or [])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["seed=1"]], initial_job_idx=0)
    sbatch = executors[0]._executor._make_submission_file_text("python -c pass", "uid")
    for line in ("--partition=gpu", "--account=myproj", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=240"):
        assert f"#SBATCH {line}" in sbatch, sbatch


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")
def test_submitit_local_config_composes(tmp_path):
    cfg = compose_with_hydra(["hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}/sweep"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("LocalLauncher") and launcher["tasks_per_node"] == 1
    assert launcher["submitit_folder"] == f"{tmp_path}/sweep/.submitit/%j"


# --- shared stages ---------------------------------------------------------------------------------------------


def teacher_context(tiny_cfg, tmp_path, *extra: str) -> StageContext:
    cfg = tiny_cfg("++pipeline.stages.teacher_sft.share=true", *extra)
    spec = resolve_stages(cfg, set(STAGE_KINDS))[0]
    run_dir = tmp_path / "run"
    return StageContext(cfg, spec, run_dir, run_dir / spec.dirname, None)


def test_a_shared_folder_is_published_once_and_reused_only_if_its_identity_matches(tiny_cfg, tmp_path):
    ctx = teacher_context(tiny_cfg, tmp_path)
    assert find_shared(ctx) is None
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_text("first")
    root = publish_shared(ctx, {"accuracy": 0.5}, export)
    (export / "model.safetensors").write_text("second")  # a concurrent job finishing the same stage later
    assert publish_shared(ctx, {"accuracy": 0.5}, export) == root
    assert (root / "export" / "model.safetensors").read_text() == "first"  # the first publisher wins
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temp folders left behind
    metrics, found = find_shared(ctx)
    assert found == root / "export" and metrics["shared_from"] == str(root)

    identity = json.loads((root / "identity.json").read_text())
    identity["seed"] += 1  # a folder whose name matches but whose content is another stage's
    (root / "identity.json").write_text(json.dumps(identity))
    with pytest.raises(PipelineConfigError, match="another stage's result"):
        find_shared(ctx)
    other = teacher_context(tiny_cfg, tmp_path, "++pipeline.stages.teacher_sft.max_steps=9")
    assert shared_dir(other) != root and find_shared(other) is None


def test_a_job_waits_for_another_job_training_the_same_shared_stage(tiny_cfg, tmp_path):
    """Two concurrent jobs need one shared teacher: the second waits on the first's lock, then reuses what the
    first published instead of training it again; a lock whose holder is gone (released) is taken over."""
    import threading

    ctx = teacher_context(tiny_cfg, tmp_path)
    root = shared_dir(ctx)
    found, first = claim_shared(root, lambda: find_shared(ctx), poll_seconds=0.02)
    assert found is None and first is not None  # nothing published, nobody training: this job trains
    result: dict = {}

    def second_job() -> None:
        result["claim"] = claim_shared(root, lambda: find_shared(ctx), poll_seconds=0.02)

    waiter = threading.Thread(target=second_job)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # blocked behind the first job's lock
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_text("trained once")
    publish_shared(ctx, {"accuracy": 0.5}, export)
    first.release()
    waiter.join(timeout=10)
    reused, lock = result["claim"]
    assert lock is None and reused[1] == root / "export" and reused[0]["shared_from"] == str(root)

    other = teacher_context(tiny_cfg, tmp_path, "++pipeline.stages.teacher_sft.max_steps=9")
    held = SharedLock(shared_dir(other))
    assert held.try_acquire()
    held.release()  # e.g. its job died: the OS drops a dead process's flock the same way
    found, lock = claim_shared(shared_dir(other), lambda: find_shared(other), poll_seconds=0.02)
    assert found is None and lock is not None
    lock.release()


def test_a_job_waits_for_another_job_scoring_the_same_store_then_reuses_it(tiny_cfg, tmp_path, one_thread):
    """The score stage takes the same lock on its store: while another job holds it, this job waits instead of
    scoring the store a second time, then reuses the store that job finished."""
    import shutil
    import threading

    share = ["++pipeline.stages.teacher_sft.share=true", "++pipeline.stages.teacher_sft.seed=5"]
    order = "pipeline.order=[teacher_sft,score]"
    first = train(tiny_cfg(order, *share, run_dir=tmp_path / "a"))
    store = Path(first["stages"][1]["metrics"]["reasoning_store"]["path"])
    finished = tmp_path / "finished_store"
    shutil.move(store, finished)  # as if the other job had not written it yet
    other_job = SharedLock(store)
    assert other_job.try_acquire()  # the other job is scoring it
    result: dict = {}
    second = threading.Thread(target=lambda: result.update(train(tiny_cfg(order, *share, run_dir=tmp_path / "b"))))
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
    assert result["stages"][1]["metrics"]["reasoning_store"]["reused"] is True


# --- wandb -----------------------------------------------------------------------------------------------------


def test_a_wandb_stage_leaves_no_wandb_state_to_the_next_job(tiny_cfg, tmp_path, monkeypatch, one_thread):
    import wandb

    for key, value in wandb_env(tmp_path).items():
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


# --- the CLI -----------------------------------------------------------------------------------------------------


def test_multirun_over_stage_orders_shares_one_teacher_and_store_and_finishes_wandb(tmp_path):
    """Two presets in one basic-sweeper multirun with the (offline) wandb logger: the first job trains and
    scores the teacher, the second reuses both; every training stage of every job has its own finished run."""
    run_cli(
        [
            "-m",
            *TINY_CLI,
            "logger=wandb",
            "++pipeline.stages.teacher_sft.share=true",
            "pipeline/preset=sft_r_sft_f_kd_f,alternation",
            PICKLE_RETURNS,
        ],
        tmp_path,
    )
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
    started_second = (jobs[1] / ".hydra" / "config.yaml").stat().st_mtime
    for style in ("reasoning", "fast"):
        assert not scored[f"{style}_store"]["reused"] and found[f"{style}_store"]["reused"]
        store = Path(found["stores"][style])
        assert store == Path(scored["stores"][style])
        assert all(f.stat().st_mtime < started_second for f in store.iterdir())
    assert len([p for p in (tmp_path / "logs" / "stores").iterdir() if not p.name.startswith(".")]) == 2  # + locks

    # wandb: one finished offline run per stage each job trained, none carried over from the first job
    run_ids = set()
    for job, payload in zip(jobs, (first, second)):
        trained = [s for s in payload["stages"] if s["kind"] in ("sft", "kd") and "shared_from" not in s["metrics"]]
        runs = sorted((job / "wandb").glob("offline-run-*"))
        assert len(runs) == len(trained) == 4
        for run in runs:
            assert "finishing run" in (run / "logs" / "debug.log").read_text()
            run_ids.add(run.name.split("-", 3)[-1])
    assert len(run_ids) == 8


def test_optuna_sweep_runs_two_trials_in_memory(tmp_path):
    """Two trials of hparams_search=kd_optuna. Tiny models answer nothing right (accuracy 0 in every trial), so
    the test optimises the final evaluation loss instead: distinct per trial, it shows which trial won."""
    run_cli(
        [
            "-m",
            "hparams_search=kd_optuna",
            *TINY_CLI,
            "logger=csv",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=1",
            "optimized_metric=loss",
            "hydra.sweeper.direction=minimize",
            PICKLE_RETURNS,
        ],
        tmp_path,
    )
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
        assert f"-k{trial['pipeline.stages.score.k']}-" in stage(payload, "kd_fast")["metrics"]["store"]
    assert params[0] != params[1] and losses[0] != losses[1]
    winner = losses.index(min(losses))
    assert best["best_value"] == pytest.approx(losses[winner])
    assert {k: str(v) for k, v in best["best_params"].items()} == params[winner]
    # the teacher is trained by the first trial only
    assert "shared_from" in stage(results(jobs[1]), "teacher_sft")["metrics"]


def test_submitit_local_launcher_runs_a_job_in_its_own_process(tmp_path):
    run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            *TINY_CLI,
            "logger=csv",
            "pipeline.order=[sft_fast]",
        ],
        tmp_path,
    )
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
def test_an_optuna_study_in_sqlite_continues_across_sweeps(tmp_path):
    """A study in a database (optuna 2 on SQLAlchemy < 2) gets the trials of every sweep that names it."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for seed in (1, 2):  # a new sampler seed per sweep, as the config advises
        run_cli(
            [
                "hparams_search=kd_optuna",
                *TINY_CLI,
                "logger=csv",
                "pipeline.order=[teacher_sft,score,kd_fast]",
                "hydra.sweeper.n_trials=1",
                f"hydra.sweeper.storage={storage}",
                f"hydra.sweeper.sampler.seed={seed}",
                f"hydra.sweep.dir={tmp_path}/sweep{seed}",
            ],
            tmp_path,
        )
    trials = optuna.load_study(study_name="kd_optuna", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].params != trials[1].params
    for seed, trial in zip((1, 2), trials):
        payload = results(tmp_path / f"sweep{seed}" / "0")
        assert trial.value == final_metric(payload, "accuracy")
    best = yaml.safe_load((tmp_path / "sweep2" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t.value for t in trials)  # over the whole study, not this sweep's trial
