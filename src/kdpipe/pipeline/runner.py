"""Run the stage order: skip finished stages, resume the running one, summarise after each."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from kdpipe.models.vocab import check_shared_vocabulary
from kdpipe.pipeline.report import rich_table, write_results
from kdpipe.pipeline.sharing import find_shared, publish_shared
from kdpipe.pipeline.spec import PipelineConfigError, StageSpec, resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS, StageContext, write_stage_metrics
from kdpipe.pipeline.state import PipelineState
from kdpipe.utils.config import print_and_save_config

console = Console()
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
    return cfg, run_dir, specs


def run_pipeline(cfg: DictConfig) -> dict:
    """Run (or resume) the pipeline a config describes; returns the ``results.json`` payload."""
    cfg, run_dir, specs = prepare(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("resume"):
        state = PipelineState.load(run_dir, specs)
    else:
        if (run_dir / "pipeline_state.json").exists():
            raise PipelineConfigError(f"{run_dir} already holds a run: pass resume={run_dir} to continue it")
        print_and_save_config(cfg, run_dir, print_tree=bool(cfg.get("print_config", True)))
        state = PipelineState.new(run_dir, specs, list(cfg.models.keys()))
        state.save()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console.rule(f"[bold]kdpipe run {run_dir}")
    for spec in specs:
        record = state.stages[spec.index]
        if record.status == "done":
            console.print(f"[dim]stage {spec.dirname} ({spec.kind}, {spec.model}) already done: skipped")
            continue
        console.rule(f"stage {spec.dirname}: {spec.kind} on {spec.model}")
        stage_dir = run_dir / spec.dirname
        stage_dir.mkdir(parents=True, exist_ok=True)
        state.mark_running(spec.index)
        ctx = StageContext(
            cfg, spec, run_dir, stage_dir, state.model_path(spec.model), dict(state.stores), dict(state.rollouts)
        )
        reused = find_shared(ctx) if spec.config.get("share") else None
        if reused is not None:
            metrics, export = reused
        else:
            metrics, export = STAGE_KINDS[spec.kind](ctx)
            if spec.config.get("share") and export is not None:
                metrics["shared_to"] = str(publish_shared(ctx, metrics, export))
        write_stage_metrics(ctx, metrics)
        state.mark_done(spec.index, metrics, export)
        write_results(state)
    payload = write_results(state)
    Console(width=max(console.width, 132)).print(rich_table(payload, title=f"kdpipe results: {run_dir}"))
    console.print(f"results: {run_dir / 'results.md'}  plot: {run_dir / 'results.png'}")
    return payload
