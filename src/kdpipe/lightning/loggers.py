"""The stage's loggers from the ``logger`` config group (one wandb run per stage, grouped by run), and teardown."""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig


def make_loggers(logger_cfg: DictConfig | None, run_dir: Path, stage_dir: Path, stage_name: str) -> list:
    """Instantiate the configured loggers for one stage (``stage_name``: its folder name, e.g. ``03_kd_fast``)."""
    loggers = []
    # multirun jobs are numbered folders: name runs by their last two path parts, id them by the full path
    run_name = "/".join(run_dir.parts[-2:]) if run_dir.name.isdigit() else run_dir.name
    run_id = hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]
    for name, cfg in (logger_cfg or {}).items():
        if cfg is None or "_target_" not in cfg:
            continue
        factory = hydra.utils.instantiate(cfg, _partial_=True)
        wandb = "Wandb" in str(cfg._target_)
        if wandb:
            kwargs = {
                "save_dir": str(run_dir),
                "name": f"{run_name}/{stage_name}",
                "group": run_name,
                "id": f"{run_id}-{stage_name}",  # stable: a resumed stage continues its wandb run
                "resume": "allow",
            }
        else:
            kwargs = {"save_dir": str(stage_dir), "name": "logs", "version": name}
        accepted = inspect.signature(factory.func).parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        logger = factory(**{k: v for k, v in kwargs.items() if k in accepted or has_var_kw})
        if wandb:  # what finish_loggers puts back (see there)
            logger.kdpipe_prior_wandb_mode = os.environ.get("WANDB_MODE")
        loggers.append(logger)
    return loggers


def log_config(loggers: list, config: dict) -> None:
    """What was run: the stage's settings, model, data and seed, as every logger's hyperparameters."""
    for logger in loggers:
        logger.log_hyperparams(config)


def flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a metrics dict (nested ones as ``a/b``); strings, lists and None left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def log_results(loggers: list, metrics: dict, step: int) -> None:
    """What it scored: the stage's final metrics (evaluation included) under ``stage/``, at its last step."""
    numbers = flat_numbers(metrics, "stage/")
    for logger in loggers:
        logger.log_metrics(numbers, step=step)


def finish_loggers(loggers: list, status: str = "success") -> None:
    """Close every logger; wandb runs are finished so the next stage (or multirun job) starts its own.

    ``WandbLogger(offline=True)`` sets ``WANDB_MODE`` for the rest of the process, and wandb keeps the settings
    of its first run in a process-wide singleton: under Hydra's basic launcher every multirun job runs in the
    same process, so a later stage or job would silently get the first one's mode. The stage puts
    ``WANDB_MODE`` back as it found it and tears wandb down, so the next run reads its own settings afresh."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger":
            import wandb  # only when a wandb logger exists: wandb is slow to import

            wandb.finish()
            if hasattr(logger, "kdpipe_prior_wandb_mode"):
                prior = logger.kdpipe_prior_wandb_mode
                if prior is None:
                    os.environ.pop("WANDB_MODE", None)
                else:
                    os.environ["WANDB_MODE"] = prior
            wandb.teardown()
