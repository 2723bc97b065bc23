"""``kdpipe-train``: run a stage pipeline. A thin Hydra entry point around :func:`train`.

kdpipe-train                                   # the default pipeline on the built-in task
kdpipe-train pipeline=tiny logger=csv          # another pipeline, CSV logs
kdpipe-train 'pipeline.order=[teacher_sft,sft_fast]'
kdpipe-train resume=logs/runs/2026-11-23_10-00-00   # continue an interrupted run
kdpipe-train trainer=npu                       # on one Ascend NPU (torch_npu + CANN; docs/ascend.md)
kdpipe-train trainer=ddp trainer.devices=4     # every stage on 4 GPUs (kdpipe.lightning.launch: how ranks start)
"""

from __future__ import annotations

import importlib.util
import sys

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from kdpipe.accelerators import register as register_accelerators
from kdpipe.cli.errors import exit_on_user_error, run_hydra_command
from kdpipe.cli.overrides import check_overrides
from kdpipe.cli.rundir import STARTED, removing_stray_run_dir
from kdpipe.lightning import launch
from kdpipe.pipeline.runner import preflight_jobs, run_pipeline
from kdpipe.pipeline.state import PipelineRun
from kdpipe.utils.dist import global_rank, is_rank_zero
from kdpipe.utils.paths import config_dir
from kdpipe.utils.quiet import quiet_third_party


def train(cfg: DictConfig) -> PipelineRun:
    """Run the pipeline ``cfg`` describes; returns its metrics (``.results``) and, apart, each stage's typed
    result (``.result(name)``: export, stores, rollouts). No global side effects."""
    return run_pipeline(cfg)


def final_metric(payload: dict, name: str) -> float | None:
    """The named metric of the last stage that reported it (what a sweeper optimises)."""
    for stage in reversed(payload["stages"]):
        if stage["metrics"].get(name) is not None:
            return float(stage["metrics"][name])
    return None


def _train_or_exit(cfg: DictConfig, prog: str) -> PipelineRun:
    """:func:`train` for a command: a user error (config, data, store, ...) is printed as one line after
    ``prog`` and exits with status 2 (:mod:`kdpipe.cli.errors`)."""
    quiet_third_party()
    register_accelerators()  # Trainer(accelerator="npu"); imports no torch_npu
    with exit_on_user_error(prog):
        return train(cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    with removing_stray_run_dir(cfg, STARTED):  # refused before any stage, or resumed elsewhere: no empty folder
        run = _train_or_exit(cfg, "kdpipe-train")
    return final_metric(run.results, str(cfg.get("optimized_metric", "accuracy")))


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a basic-sweeper multirun (``a,b`` and ``range()`` expanded)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


def preflight_sweep(args: list[str]) -> None:
    """``kdpipe-train -m ...`` with the basic sweeper: every job's preflight before the first job trains. A
    sweeper plugin samples its jobs as it goes (Optuna): each of those is checked when it starts."""
    if any(a.startswith(("hparams_search=", "hydra/sweeper=")) and a != "hparams_search=null" for a in args):
        return
    jobs = sweep_jobs([a for a in args if a not in ("-m", "--multirun") and not a.startswith("hydra")])
    if len(jobs) < 2:
        return
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        composed = [(f"{n} ({' '.join(job)})", compose("train", overrides=job)) for n, job in enumerate(jobs)]
    print(f"kdpipe-train: preflight of the sweep's {len(jobs)} jobs")
    preflight_jobs(composed)


def show_sweep_configs(args: list[str]) -> None:
    """``kdpipe-train -m <sweep> --cfg job|all``: print the config of every job the sweep would run (Hydra
    itself refuses ``--cfg`` with ``-m``). Only the basic sweeper's ``a,b`` and ``range()`` sweeps are
    expanded; a sweeper plugin's own search space (Optuna's ``interval``) is listed, not sampled."""
    which = args[args.index("--cfg") + 1] if "--cfg" in args[:-1] else "job"
    skip = {"-m", "--multirun", "--cfg", which}
    jobs = sweep_jobs([a for a in args if a not in skip])
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        for number, job in enumerate(jobs):
            cfg = compose("train", overrides=list(job), return_hydra_config=which == "all")
            print(f"# job {number}: {' '.join(job)}")
            print(OmegaConf.to_yaml(cfg))


def run_joined_rank(cfg: DictConfig) -> None:
    """A rank that Lightning's launcher started for a running pipeline: run the launching job's config (see
    :mod:`kdpipe.lightning.launch`), then exit; Hydra never sees the repeated command line."""
    _train_or_exit(cfg, f"kdpipe-train (rank {global_rank()})")


# command-line choices that need a Hydra plugin of the `sweeps` extra: (argument prefix, plugin module)
SWEEP_PLUGINS = (
    ("hparams_search=", "hydra_plugins.hydra_optuna_sweeper"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher"),
)


def missing_sweep_plugin(args: list[str]) -> str | None:
    """The argument that selects a sweeper or launcher plugin this environment lacks, or None."""
    for arg in args:
        for prefix, module in SWEEP_PLUGINS:
            if arg.startswith(prefix) and arg != "hparams_search=null" and importlib.util.find_spec(module) is None:
                return arg
    return None


def main() -> None:
    """``kdpipe-train``: Hydra's entry point; in a process started by a multi-process trainer, that job's rank."""
    launch.ENTRY_POINT = True  # multi-process trainers may re-run this command for their other ranks
    with exit_on_user_error(f"kdpipe-train (rank {global_rank()})"):
        joined = launch.joined_config()
    if joined is not None:
        run_joined_rank(joined)
        return
    args = sys.argv[1:]
    missing = missing_sweep_plugin(args)
    if missing is not None:
        print(f"kdpipe-train: config error: {missing} needs Hydra's sweep plugins: pip install 'kdpipe[sweeps]'",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    if {"-m", "--multirun"} & set(args) and {"--cfg", "-c"} & set(args):
        with exit_on_user_error("kdpipe-train"):
            check_overrides(args, "train")
            show_sweep_configs(["--cfg" if a == "-c" else a for a in args])
        return
    if not is_rank_zero():  # started by torchrun / srun: rank 0 alone writes Hydra's config copy and job log
        given = {arg.split("=", 1)[0] for arg in sys.argv[1:]}
        quiet = ("hydra.output_subdir=null", "hydra/job_logging=stdout")
        sys.argv += [override for override in quiet if override.split("=")[0] not in given]

    def check() -> None:  # an unknown key (and, for a sweep, any job's problem) is refused before Hydra runs
        check_overrides(args, "train")
        if {"-m", "--multirun"} & set(args):
            preflight_sweep(args)

    run_hydra_command("kdpipe-train", hydra_main, check=check)


if __name__ == "__main__":
    main()
