"""Running a pipeline on several processes: how the ranks start, and how they stay in step.

Design. A pipeline is several stages, and only some of them train: a multi-process job therefore runs the
*whole pipeline on every rank*, in lockstep, and one process group serves all its stages:

* **Starting the ranks.** Before stage 0, :func:`distributed_job` builds the trainer config's Lightning
  strategy and lets Lightning start the job: with ``strategy=ddp`` (also FSDP and DeepSpeed) on one machine its
  subprocess-script launcher starts ``devices - 1`` more processes; under torchrun, SLURM (``srun``, Hydra's
  submitit launcher) or LSF the processes exist already and Lightning's cluster environment says so. Then the
  strategy's ``setup_environment`` joins the process group. Every stage's own ``Trainer`` later finds that group
  and reuses it (Lightning starts no processes when ``LOCAL_RANK`` is set).
* **Why at the start and not at the first ``fit``.** Lightning's launcher re-runs the command line in the new
  processes. Started at the first ``fit`` (Lightning's default), the new processes would begin the pipeline
  from scratch while rank 0 is in the middle of it. Started before stage 0, every rank runs the same stages
  from the same state, and the ranks can meet at barriers in stages that do not train (evaluations, rollouts).
* **What the new processes run.** Lightning's Hydra-aware command (``_hydra_subprocess_cmd``) repeats
  ``sys.argv`` with the parent's ``hydra.run.dir``: right for one run, wrong for a multirun (each child would
  start the whole sweep, or a whole Optuna study) and for multirun job folders. So the parent writes its job's
  *composed and resolved* config to a temp file and names it in ``KDPIPE_JOIN_CONFIG``; ``kdpipe-train`` in a
  child sees that variable before Hydra parses anything and runs exactly that config (same run dir, same job).
  Hence a pipeline that starts processes itself must be started by ``kdpipe-train`` (or ``python -m
  kdpipe.cli.train``); a script calling :func:`~kdpipe.pipeline.runner.run_pipeline` needs torchrun or SLURM.
* **Multirun.** The group belongs to the job: at the end of each job the parent destroys it and forgets the
  launcher's variables (``LOCAL_RANK``, ``MASTER_PORT``, ...), its children exit, and the next job starts its
  own ranks on a fresh port.
* **Who writes.** Training, checkpoints, loggers and store shards are Lightning's and the store's business
  (checkpoints and loggers on rank 0, shard ``i`` on rank ``i % world_size``). Everything else a pipeline
  writes (``config.yaml``, ``pipeline_state.json``, ``results.*``, stage ``metrics.json``, exports, shared
  stages, evaluation generations, rollouts, score caches) is written by global rank 0; the others wait at a
  barrier before they read it (e.g. the export the next stage starts from).
* **Stages that do not train** (``eval``, ``rollout``, and the evaluation at the end of a training stage) run
  on rank 0 while the others wait (:func:`~kdpipe.utils.dist.run_on_rank_zero`), so their results are exactly
  those of a one-process run; they are short next to training. The wait is bounded by the process group's
  timeout (30 minutes by default): raise ``trainer.strategy.timeout`` for long evaluations.
* **Not ``ddp_spawn``.** A spawn launcher runs only ``fit`` in new processes, once per stage, pickling the
  module, data and store readers each time, and leaves the rest of the pipeline on one process; it also
  cannot span nodes without the same per-node command. It is refused with a pointer to ``strategy=ddp``.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.strategy import check_strategy, maybe_several_processes, strategy_name
from kdpipe.lightning.trainer import instantiate_trainer
from kdpipe.utils.dist import is_initialized
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

JOIN_ENV = "KDPIPE_JOIN_CONFIG"  # path of the config a rank started by Lightning's launcher runs
# what Lightning's subprocess launcher puts into the parent's environment when it starts the children
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
ENTRY_POINT = False  # set by ``kdpipe-train``: this process's command line can be re-run as a rank


def _write_join_config(cfg: DictConfig) -> str:
    fd, path = tempfile.mkstemp(prefix="kdpipe-join-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    return path


@dataclass
class DistributedJob:
    """The process group a pipeline set up (if any), and what to undo when the pipeline ends."""

    owns_group: bool = False
    launcher: object | None = None  # Lightning's subprocess launcher, when this process started the others
    restore_env: dict[str, str | None] = field(default_factory=dict)

    def abort(self) -> None:
        """Kill the processes this one started: they would wait for it in a collective until the timeout (and
        a rank stuck in one does not act on a polite signal; Lightning kills its children the same way)."""
        if self.launcher is not None:
            self.launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))

    def close(self) -> None:
        """Destroy the group this pipeline created and forget the launcher's variables (the next multirun job
        starts its own ranks)."""
        if self.owns_group and is_initialized():
            dist.destroy_process_group()
        for key, value in self.restore_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_ranks(cfg: DictConfig) -> DistributedJob:
    """Start the job's other processes (when none exist yet) and join the process group, before stage 0.

    A no-op for a one-process trainer config, or when a process group exists already (the caller owns it)."""
    check_strategy(cfg.trainer)
    if is_initialized() or not maybe_several_processes(cfg.trainer):
        return DistributedJob()
    trainer = instantiate_trainer(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    strategy = trainer.strategy
    launcher = strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        raise PipelineConfigError(
            f"trainer.strategy={strategy_name(cfg.trainer)!r} starts processes by spawning or forking, once per "
            "fit, which a multi-stage pipeline cannot use: use strategy=ddp (trainer=ddp or trainer=ddp_cpu), "
            "which runs every rank through the whole pipeline"
        )
    # the strategy's own count (its world_size is only known once the environment is set up)
    processes = int(getattr(strategy, "num_nodes", 1)) * int(getattr(strategy, "num_processes", 1))
    started = int(os.environ.get("WORLD_SIZE", 1) or 1)
    if processes <= 1 and started > 1:
        raise PipelineConfigError(
            f"this job was started as {started} processes (WORLD_SIZE), but the trainer runs one: every process "
            "would run its own pipeline in the same run dir. Set trainer.devices (and trainer.num_nodes) to match"
        )
    environment = strategy.cluster_environment
    spawns = launcher is not None and environment is not None and not environment.creates_processes_externally
    if processes <= 1 and not spawns:
        return DistributedJob()
    job = DistributedJob(owns_group=True)
    join_path = None
    if spawns:  # this process starts the job's other processes on this machine
        if not ENTRY_POINT:
            raise PipelineConfigError(
                "a multi-process trainer starts its other processes by re-running the command, which only "
                "kdpipe-train (or python -m kdpipe.cli.train) can do for a pipeline: run it that way, or start every "
                "process yourself (torchrun, srun)"
            )
        job.restore_env = {key: os.environ.get(key) for key in (*LAUNCHER_ENV, JOIN_ENV)}
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores (Lightning does so only after starting them)
            threads = max(1, (os.cpu_count() or 1) // int(getattr(strategy, "num_processes", 1)))
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        join_path = _write_join_config(cfg)
        os.environ[JOIN_ENV] = join_path
        try:
            launcher.launch(lambda: None)  # Popen the children (they inherit the environment), then return
        finally:
            os.environ.pop(JOIN_ENV, None)
        job.launcher = launcher
    try:
        strategy.setup_environment()  # every rank meets here: the process group exists once this returns
    except BaseException:
        job.abort()
        raise
    finally:
        if join_path is not None:  # the children are in the group (or gone): they have read it
            Path(join_path).unlink(missing_ok=True)
    return job


@contextmanager
def distributed_job(cfg: DictConfig) -> Iterator[DistributedJob]:
    """Run the body with the job's ranks started and connected (see the module docstring); clean up after."""
    job = start_ranks(cfg)
    try:
        yield job
    except BaseException:
        job.abort()
        raise
    finally:
        job.close()


def joined_config() -> DictConfig | None:
    """The config a rank started by Lightning's launcher must run (``KDPIPE_JOIN_CONFIG``), or None."""
    path = os.environ.get(JOIN_ENV)
    if not path:
        return None
    if not Path(path).exists():
        raise PipelineConfigError(f"{JOIN_ENV}={path}: the launching process's config file is gone")
    return OmegaConf.load(path)
