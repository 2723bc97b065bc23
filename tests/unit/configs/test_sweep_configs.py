"""The sweep configs as a multirun composes them (the ``hydra`` node included): the Optuna search over the KD
settings, the submitit launchers, the curriculum ablation. (Sweeps that run: tests/integration/test_sweeps.py.)"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS
from tests.helpers import compose_cfg


def test_kd_optuna_searches_the_kd_settings_and_maximises_accuracy(tmp_path):
    cfg = compose_cfg(["hparams_search=kd_optuna", f"paths.root_dir={tmp_path}"], hydra=True)
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
    cfg = compose_cfg(["hparams_search=kd_optuna", f"paths.root_dir={tmp_path}", *overrides], hydra=True)
    specs = {s.name: s.config for s in resolve_stages(cfg, set(STAGE_KINDS))}
    assert [n for n, s in specs.items() if s.kind == "kd"] == ["kd_reasoning", "kd_fast"]
    for name in ("kd_reasoning", "kd_fast"):
        loss = specs[name].loss
        assert (loss.ce_weight, loss.temperature, loss.divergence, loss.beta) == (0.25, 1.5, "jsd", 0.3)
        assert specs[name].optimizer.lr == 1.0e-3
        assert specs[name].loss.tail == "bucket"  # the keys not searched keep the KD defaults
    assert specs["score"].k == 8
    # the SFT stages keep the global rate, so they are the same (and shared) in every trial (the default
    # order trains no teacher: it starts from the shipped one)
    assert "teacher_sft" not in specs
    assert specs["sft_reasoning"].optimizer.lr == cfg.optimizer.lr != 1.0e-3
    assert specs["sft_reasoning"].share and cfg.pipeline.stages.teacher_sft.share


def test_kd_optuna_without_overrides_keeps_the_kd_defaults():
    plain = {s.name: s.config for s in resolve_stages(compose_cfg([], hydra=True), set(STAGE_KINDS))}
    cfg = compose_cfg(["hparams_search=kd_optuna"], hydra=True)
    searched = {s.name: s.config for s in resolve_stages(cfg, set(STAGE_KINDS))}
    for name in ("kd_reasoning", "kd_fast", "score"):
        assert searched[name] == plain[name]


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")  # see the config's header
def test_submitit_slurm_config_exposes_the_cluster_keys(tmp_path, monkeypatch):
    import hydra
    import submitit

    cfg = compose_cfg(
        [
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=myproj",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.timeout_min=240",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        hydra=True,
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
    cfg = compose_cfg(["hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}/sweep"], hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("LocalLauncher") and launcher["tasks_per_node"] == 1
    assert launcher["submitit_folder"] == f"{tmp_path}/sweep/.submitit/%j"


def test_curriculum_ablation_composes_four_schedules_times_three_seeds():
    cfg = compose_cfg(["experiment=curriculum_ablation"], hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params.curriculum.split(",") == ["random", "sorted", "competence", "reverse"]
    assert len(str(params.seed).split(",")) >= 3
    assert list(cfg.pipeline.order) == ["sft_reasoning"]


def _teacher_strength_cell(*overrides):
    cfg = compose_cfg(["experiment=teacher_strength", *overrides])
    return cfg, {s.name: s for s in resolve_stages(cfg, set(STAGE_KINDS))}


def test_teacher_strength_nests_two_teacher_seeds_per_strength_in_the_five_student_seeds():
    cfg = compose_cfg(["experiment=teacher_strength"], hydra=True)
    params = cfg.hydra.sweeper.params
    seeds = [int(s) for s in str(params.seed).split(",")]
    assert len(seeds) >= 5 and params.strength.split(",") == ["weak", "strong"]
    teachers = {compose_cfg(["experiment=teacher_strength", f"seed={s}"]).teacher for s in seeds}
    assert teachers == {"strong_1", "strong_2"}  # both teacher seeds appear among the student seeds of a cell


def test_teacher_strength_trains_its_teachers_on_clean_data_and_the_student_on_the_noisy_labels():
    cfg, stages = _teacher_strength_cell("strength=weak", "method=kd", "seed=2")
    assert list(stages) == ["teacher_sft", "teacher_reasoning_eval", "score", "kd_reasoning"]
    teacher = stages["teacher_sft"].config
    assert teacher.share and teacher.seed == 2 and cfg.models.teacher.arch.hidden_size == 128
    assert teacher.data.label_noise.rate == 0.0 and cfg.data.label_noise.rate > 0  # the student's labels stay noisy
    shipped, stages = _teacher_strength_cell("strength=strong", "method=kd", "seed=1")
    assert list(stages) == ["teacher_reasoning_eval", "score", "kd_reasoning"]  # the shipped teacher: no training
    assert shipped.models.teacher.source == "pretrained"
    _, sft = _teacher_strength_cell("strength=strong", "method=sft", "seed=1")
    _, sft_weak = _teacher_strength_cell("strength=weak", "method=sft", "seed=1")
    assert sft["sft_reasoning"].config == sft_weak["sft_reasoning"].config and sft["sft_reasoning"].config.share
    assert sft["sft_reasoning"].config.max_steps == stages["kd_reasoning"].config.max_steps
