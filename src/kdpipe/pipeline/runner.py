"""Run the stage order: skip finished stages, resume the running one, summarise after each."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from kdpipe.models.vocab import check_shared_vocabulary
from kdpipe.pipeline.launch import distributed_job
from kdpipe.pipeline.report import rich_table, write_results
from kdpipe.pipeline.sharing import claimed, find_shared, publish_shared, shared_dir
from kdpipe.pipeline.spec import PipelineConfigError, StageSpec, resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS, StageContext, check_trainer_device, write_stage_metrics
from kdpipe.pipeline.state import STATE_FILE, PipelineState
from kdpipe.utils.config import print_and_save_config
from kdpipe.utils.dist import barrier, broadcast_object, is_rank_zero, rank_zero_console, run_on_rank_zero, world_size

console = rank_zero_console()
# keys that may differ between a run's saved config and the command that resumes it
RESUME_FREE_KEYS = ("resume", "paths", "print_config")


def _flat(cfg: DictConfig) -> dict:
    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node

    container = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in walk(container) if k.split(".")[0] not in RESUME_FREE_KEYS}


def config_for_resume(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The saved config of the run named by ``cfg.resume`` (the source of truth when resuming)."""
    run_dir = Path(str(cfg.resume)).expanduser().resolve()
    if not run_dir.is_dir():
        raise PipelineConfigError(f"resume directory {run_dir} does not exist")
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise PipelineConfigError(f"resume directory {run_dir} has no config.yaml: not a kdpipe run")
    saved = OmegaConf.load(saved_path)
    old, new = _flat(saved), _flat(cfg)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed and cfg.get("resume_overrides", "warn") == "error":
        raise PipelineConfigError(f"resume: the command's config differs from the run's at {changed}")
    if changed:
        console.print(f"[yellow]resume: using the run's saved config; ignoring differences at {changed[:8]}")
    saved.resume = str(run_dir)
    saved.paths.run_dir = str(run_dir)
    return saved, run_dir


def prepare(cfg: DictConfig) -> tuple[DictConfig, Path, list[StageSpec]]:
    """Validate everything that can be checked before a stage runs; return (config, run dir, stages)."""
    if cfg.get("resume"):
        cfg, run_dir = config_for_resume(cfg)
    else:
        run_dir = Path(str(cfg.paths.run_dir)).expanduser().resolve()
    specs = resolve_stages(cfg, set(STAGE_KINDS))
    check_shared_vocabulary(cfg, specs)  # teacher and student tokenizers only: cheap, and before any stage
    check_trainer_device(cfg.trainer)  # e.g. trainer=npu without torch_npu or CANN: say what to install or source
    return cfg, run_dir, specs


def run_pipeline(cfg: DictConfig) -> dict:
    """Run (or resume) the pipeline a config describes; returns the ``results.json`` payload.

    With a multi-process trainer every rank runs this, in step, over one process group (see
    :mod:`kdpipe.pipeline.launch`): training and scoring stages on every rank, everything else on global rank 0."""
    cfg, run_dir, specs = prepare(cfg)
    with distributed_job(cfg):
        return _run_stages(cfg, run_dir, specs)


# kinds that run no Lightning Trainer: rank 0 runs them and hands the others its (metrics, export)
RANK_ZERO_KINDS = frozenset({"eval", "rollout"})


def _run_stages(cfg: DictConfig, run_dir: Path, specs: list[StageSpec]) -> dict:
    # ranks started by torchrun or srun compose their own config: they all take rank 0's run dir
    agreed = Path(broadcast_object(str(run_dir)))
    if agreed != run_dir:
        run_dir = agreed
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    rank_zero = is_rank_zero()
    holds_run = (run_dir / STATE_FILE).exists()  # every rank looks before rank 0 writes anything
    if cfg.get("resume"):
        state = PipelineState.load(run_dir, specs)
    elif holds_run:
        raise PipelineConfigError(f"{run_dir} already holds a run: pass resume={run_dir} to continue it")
    else:
        state = PipelineState.new(run_dir, specs, list(cfg.models.keys()))
    barrier()
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.get("resume"):
            print_and_save_config(cfg, run_dir, print_tree=bool(cfg.get("print_config", True)))
    state.save()  # rank 0 only, like every write of the run's own files below
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console.rule(f"[bold]kdpipe run {run_dir}" + (f" ({world_size()} ranks)" if world_size() > 1 else ""))
    for spec in specs:
        record = state.stages[spec.index]
        if record.status == "done":
            console.print(f"[dim]stage {spec.dirname} ({spec.kind}, {spec.model}) already done: skipped")
            continue
        console.rule(f"stage {spec.dirname}: {spec.kind} on {spec.model}")
        stage_dir = run_dir / spec.dirname
        stage_dir.mkdir(parents=True, exist_ok=True)  # every rank: Lightning and the store write below it
        state.mark_running(spec.index)
        ctx = StageContext(
            cfg, spec, run_dir, stage_dir, state.model_path(spec.model), dict(state.stores), dict(state.rollouts)
        )
        share = bool(spec.config.get("share"))
        # one decision for all ranks; a concurrent job training the same shared stage is waited for
        root = shared_dir(ctx) if share and rank_zero else None  # only rank 0 looks and locks
        with claimed(root, lambda ctx=ctx: find_shared(ctx)) if share else nullcontext() as reused:
            if reused is not None:
                metrics, export = reused
            else:
                run_kind = STAGE_KINDS[spec.kind]
                if spec.kind in RANK_ZERO_KINDS:
                    metrics, export = run_on_rank_zero(run_kind, ctx)
                else:
                    metrics, export = run_kind(ctx)
                if share and export is not None:
                    metrics["shared_to"] = str(run_on_rank_zero(publish_shared, ctx, metrics, export))
        write_stage_metrics(ctx, metrics)
        state.mark_done(spec.index, metrics, export)
        write_results(state)
        barrier()  # the next stage may read what rank 0 wrote for this one
    payload = write_results(state)
    if rank_zero:
        Console(width=max(console.width, 132)).print(rich_table(payload, title=f"kdpipe results: {run_dir}"))
        console.print(f"results: {run_dir / 'results.md'}  plot: {run_dir / 'results.png'}")
    return payload
