"""Run the stage order: skip finished stages, resume the running one, summarise after each."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.launch import distributed_job
from kdpipe.lightning.trainer import check_trainer_device
from kdpipe.pipeline.checks import check_evaluations, check_optimized_metric, check_shared_vocabulary
from kdpipe.pipeline.preflight import preflight
from kdpipe.pipeline.report import comparison_lines, table_rows, write_results
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.sharing import find_shared, publish_shared, shared_dir
from kdpipe.pipeline.spec import StageSpec, complete_stages, control_target, resolve_stages
from kdpipe.pipeline.stages import RANK_ZERO_KINDS, STAGE_KINDS, StageContext
from kdpipe.pipeline.state import STATE_FILE, PipelineRun, PipelineState
from kdpipe.utils.claim import SharedLock, claimed
from kdpipe.utils.config import print_and_save_config
from kdpipe.utils.dist import barrier, broadcast_object, is_rank_zero, rank_zero_console, run_on_rank_zero, world_size
from kdpipe.utils.io import atomic_write_json
from kdpipe.utils.tables import rich_table

console = rank_zero_console()
# keys about the command itself, not the run: they may differ between the saved config and a resuming command
RESUME_FREE_KEYS = ("resume", "resume_overrides", "store_verify", "paths", "print_config", "hydra")


def absolute_paths(cfg: DictConfig) -> None:
    """Make the run's paths absolute (in place): ``paths.root_dir`` (so the log, run and store folders below it
    follow), local data files and model paths. A run resumed from another working directory then reads and
    writes where it started."""
    with open_dict(cfg):
        cfg.paths.root_dir = str(Path(str(cfg.paths.root_dir)).expanduser().resolve())
        data = cfg.get("data")
        for split, file in list(((data.get("files") if data is not None else None) or {}).items()):
            if file is not None:
                data.files[split] = str(Path(str(file)).expanduser().resolve())
        if data is not None and data.get("path") and Path(str(data.path)).expanduser().exists():
            data.path = str(Path(str(data.path)).expanduser().resolve())
        for model in (cfg.get("models") or {}).values():
            if model.get("path") and Path(str(model.path)).expanduser().exists():
                model.path = str(Path(str(model.path)).expanduser().resolve())


def _flat(cfg: DictConfig) -> dict:
    """Every leaf of the config, resolved (a saved config is), as ``dotted.key -> value``; command keys left out."""

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node

    copy = cfg.copy()
    with open_dict(copy):
        copy.pop("hydra", None)
        if "paths" in copy:
            copy.paths.run_dir = "<run>"  # Hydra's runtime output dir: about the command, and unset outside Hydra
    container = OmegaConf.to_container(copy, resolve=True)
    return {k: v for k, v in walk(container) if k.split(".")[0] not in RESUME_FREE_KEYS}


def config_for_resume(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The saved config of the run named by ``cfg.resume`` (the source of truth when resuming). The command's
    config is compared with it like with like (both resolved, paths absolute, keys about the command itself
    left out): every real difference is named, and refused under ``resume_overrides=error``."""
    run_dir = Path(str(cfg.resume)).expanduser().resolve()
    if not run_dir.is_dir():
        raise PipelineConfigError(f"resume directory {run_dir} does not exist")
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise PipelineConfigError(f"resume directory {run_dir} has no config.yaml: not a kdpipe run")
    saved = OmegaConf.load(saved_path)
    complete_stages(cfg)  # as the saved config holds them
    absolute_paths(cfg)
    old, new = _flat(saved), _flat(cfg)
    changed = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]  # fmt: skip
    if changed and cfg.get("resume_overrides", "warn") == "error":
        raise PipelineConfigError(f"resume: the command's config differs from the run's: {'; '.join(changed)}")
    if changed:
        console.print(
            f"[yellow]resume: continuing with the run's saved config; the command's {len(changed)} differences "
            f"are ignored (resume_overrides=error refuses them): {'; '.join(changed)}"
        )
    saved.resume = str(run_dir)
    saved.paths.run_dir = str(run_dir)
    saved.store_verify = cfg.get("store_verify", "full")  # about this start, not the run
    return saved, run_dir


def resolve_auto_resume(cfg: DictConfig) -> None:
    """``resume=auto``: continue the run already in this run's own folder (``paths.run_dir``, e.g. a sweep job
    of a fixed ``hydra.sweep.dir`` run again), or start it there when the folder holds no run yet."""
    if str(cfg.get("resume")) != "auto":
        return
    run_dir = Path(str(cfg.paths.run_dir)).expanduser().resolve()
    with open_dict(cfg):
        cfg.resume = str(run_dir) if (run_dir / "config.yaml").exists() else None


def prepare(cfg: DictConfig) -> tuple[DictConfig, Path, list[StageSpec]]:
    """Validate everything that can be checked before a stage runs; return (config, run dir, stages)."""
    resolve_auto_resume(cfg)
    if cfg.get("resume"):
        cfg, run_dir = config_for_resume(cfg)
    else:
        run_dir = Path(str(cfg.paths.run_dir)).expanduser().resolve()
        complete_stages(cfg)
        absolute_paths(cfg)
    specs = resolve_stages(cfg, set(STAGE_KINDS))
    finished = PipelineState.load(run_dir, specs) if cfg.get("resume") else None
    preflight(cfg, specs, run_dir, finished)  # every problem at once, before any stage trains
    check_shared_vocabulary(cfg, specs)  # teacher and student tokenizers only: cheap, and before any stage
    check_trainer_device(cfg.trainer)  # e.g. trainer=npu without torch_npu or CANN: say what to install or source
    check_optimized_metric(cfg, check_evaluations(cfg, specs))  # a metric without references: refused now
    return cfg, run_dir, specs


def preflight_jobs(jobs: list[tuple[str, DictConfig]]) -> None:
    """A multirun's preflight: every job's (name, config) is checked as :func:`prepare` checks a run, before
    the first job trains; one :class:`PipelineConfigError` names each job that cannot start and why."""
    failed = []
    for name, cfg in jobs:
        if cfg.get("resume") and str(cfg.resume) != "auto":
            continue  # a resumed job is checked against its own saved run when it starts
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.paths.run_dir = str(Path(str(cfg.paths.log_dir)).expanduser() / "multiruns" / "preflight")
        try:
            prepare(cfg)
        except PipelineConfigError as err:
            failed.append(f"job {name}: {err}")
    if failed:
        raise PipelineConfigError(f"{len(failed)} of {len(jobs)} sweep jobs cannot start:\n" + "\n".join(failed))


def run_pipeline(cfg: DictConfig) -> PipelineRun:
    """Run (or resume) the pipeline a config describes; returns its metrics and, apart, its stages' results.

    With a multi-process trainer every rank runs this, in step, over one process group (see
    :mod:`kdpipe.lightning.launch`): training and scoring stages on every rank, everything else on global rank 0."""
    cfg, run_dir, specs = prepare(cfg)
    with distributed_job(cfg):
        return _run_stages(cfg, run_dir, specs)


def write_stage_metrics(ctx: StageContext, result: StageResult) -> None:
    """The stage's ``metrics.json``: its metrics, what it read, and its settings (global rank 0 only)."""
    if not is_rank_zero():
        return
    payload = {"name": ctx.spec.name, "kind": ctx.spec.kind, "model": ctx.spec.model, "metrics": result.metrics}
    payload["artifacts"] = {k: v for k, v in result.to_json(ctx.run_dir).items() if k != "metrics"}
    payload["settings"] = OmegaConf.to_container(ctx.settings, resolve=True)
    atomic_write_json(ctx.stage_dir / "metrics.json", payload)


def run_stage(ctx: StageContext) -> StageResult:
    """One stage, or its published result when it is shared (``share: true``) and another run trained it."""
    spec, share = ctx.spec, bool(ctx.settings.get("share"))
    # one decision for all ranks; a concurrent job training the same shared stage is waited for
    root = shared_dir(ctx) if share and is_rank_zero() else None  # only rank 0 looks and locks
    with claimed(root, lambda: find_shared(ctx)) if share else nullcontext() as reused:
        if reused is not None:
            return reused
        run_kind = STAGE_KINDS[spec.kind]
        result = run_on_rank_zero(run_kind, ctx) if spec.kind in RANK_ZERO_KINDS else run_kind(ctx)
        if share and result.export is not None:
            result.metrics["shared_to"] = str(run_on_rank_zero(publish_shared, ctx, result))
        return result


def _run_stages(cfg: DictConfig, run_dir: Path, specs: list[StageSpec]) -> PipelineRun:
    # ranks started by torchrun or srun compose their own config: they all take rank 0's run dir
    agreed = Path(broadcast_object(str(run_dir)))
    if agreed != run_dir:
        run_dir = agreed
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    rank_zero = is_rank_zero()
    lock = SharedLock(run_dir / "run")  # <run>/.run.lock: one kdpipe-train per run directory at a time
    if rank_zero and not lock.try_acquire():
        raise PipelineConfigError(f"{run_dir} is in use by another kdpipe-train (it holds {lock.path}): wait for it")
    try:
        return _run_locked(cfg, run_dir, specs, rank_zero)
    finally:
        lock.release()


def _run_locked(cfg: DictConfig, run_dir: Path, specs: list[StageSpec], rank_zero: bool) -> PipelineRun:
    holds_run = (run_dir / STATE_FILE).exists()  # every rank looks before rank 0 writes anything
    if cfg.get("resume"):
        state = PipelineState.load(run_dir, specs)
    elif holds_run:
        raise PipelineConfigError(f"{run_dir} already holds a run: pass resume={run_dir} to continue it")
    else:
        state = PipelineState.new(run_dir, specs)
    barrier()
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.get("resume"):
            print_and_save_config(cfg, run_dir, print_tree=bool(cfg.get("print_config", True)))
    state.save()  # rank 0 only, like every write of the run's own files below
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console.rule(f"[bold]kdpipe run {run_dir}" + (f" ({world_size()} ranks)" if world_size() > 1 else ""))
    controls = frozenset(s.index for s in specs if control_target(s, specs) is not None)
    control_names = {specs[i].name: str(specs[i].config.control_of) for i in controls}
    for spec in specs:
        if state.stages[spec.index].status == "done":
            console.print(f"[dim]stage {spec.dirname} ({spec.kind}, {spec.model}) already done: skipped")
            continue
        console.rule(f"stage {spec.dirname}: {spec.kind} on {spec.model}")
        stage_dir = run_dir / spec.dirname
        stage_dir.mkdir(parents=True, exist_ok=True)  # every rank: Lightning and the store write below it
        state.mark_running(spec.index)
        # a control starts where the stage it controls started; no later stage continues from a control
        start_from = state.model_path(spec.model, before=control_target(spec, specs), skip=controls)
        ctx = StageContext(cfg, spec, run_dir, stage_dir, start_from, state.stores, state.rollouts, order=specs)
        result = run_stage(ctx)
        write_stage_metrics(ctx, result)
        state.mark_done(spec.index, result)
        write_results(state, control_names)
        barrier()  # the next stage may read what rank 0 wrote for this one
    payload = write_results(state, control_names)
    if rank_zero:
        Console(width=max(console.width, 132)).print(
            rich_table(*table_rows(payload), title=f"kdpipe results: {run_dir}")
        )
        for line in comparison_lines(payload):
            console.print(line)
        console.print(f"results: {run_dir / 'results.md'}  plot: {run_dir / 'results.png'}")
    return PipelineRun(run_dir, payload, state.stages)
