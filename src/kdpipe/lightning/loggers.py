"""The stage's loggers from the ``logger`` config group (one wandb run per stage, grouped by run), what they
record (the stage's config, its metrics under ``stage/``, its evaluation under ``eval/``, a sample of its
generations), what a resumed stage keeps of an interrupted attempt's logs, and teardown."""

from __future__ import annotations

import csv
import hashlib
import inspect
import itertools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig, OmegaConf

from kdpipe.utils.dist import is_rank_zero, rank_zero_console
from kdpipe.utils.io import atomic_write_text
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

console = rank_zero_console()

GENERATIONS_SAMPLE = 32  # rows of generations.jsonl a logger gets unless its `generations_sample` says otherwise
OWN_KEYS = ("generations_sample", "quiet")  # kdpipe's keys in a logger's config: not the logger's arguments
QUIET_WANDB = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}  # `quiet: true`: no wandb output, no capture
WANDB_ENV = ("WANDB_MODE", *QUIET_WANDB)  # what a wandb stage may set, and finish_loggers puts back


def is_wandb(logger) -> bool:
    """Whether ``logger`` is Lightning's ``WandbLogger`` (checked by name: wandb is slow to import)."""
    return type(logger).__name__ == "WandbLogger"


def logger_kwargs(wandb: bool, name: str, run_dir: Path, stage_dir: Path, stage_name: str) -> dict:
    """Where logger ``name`` writes: wandb runs under the run dir (named, grouped and id'd by the pipeline run),
    the others under ``<stage>/logs/<name>``."""
    if not wandb:
        return {"save_dir": str(stage_dir), "name": "logs", "version": name}
    # multirun jobs are numbered folders: name runs by their last two path parts, id them by the full path
    run_name = "/".join(run_dir.parts[-2:]) if run_dir.name.isdigit() else run_dir.name
    run_id = hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]
    return {
        "save_dir": str(run_dir),
        "name": f"{run_name}/{stage_name}",
        "group": run_name,
        "id": f"{run_id}-{stage_name}",  # stable: a resumed stage continues its wandb run (online; see docs)
        "resume": "allow",
    }


def row_step(row: dict) -> float:
    """The ``step`` of a row read back from a ``metrics.csv`` (a row without one: -1, kept as logged first)."""
    try:
        return float(row.get("step") or -1)
    except ValueError:
        return -1.0


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an earlier attempt's ``metrics.csv`` is kept, not deleted.

    Its rows are read back when the writer starts; the first save writes those logged before ``resume_step``
    (None: before the first step logged now), then the new rows as Lightning does. So a resumed stage's file
    holds every step once: what the interrupted attempt logged up to its checkpoint, then the resumed part."""

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self.resume_step = resume_step
        self.earlier: list[dict] | None = None  # the earlier attempt's rows, until the first save merges them
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Read an earlier attempt's rows back (Lightning warns here, then deletes the file)."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.earlier = list(csv.DictReader(file))

    def save(self) -> None:
        """Save the rows logged since the last save (the first time, after the earlier attempt's kept rows)."""
        if self.earlier is not None and self.metrics:
            self.keep_earlier()
        super().save()

    def keep_earlier(self) -> None:
        """Rewrite ``metrics.csv`` with the earlier rows logged before the resume step (the rest are logged
        again by the resumed stage); the new rows are appended after them."""
        first_new = min(row_step(row) for row in self.metrics)
        boundary = first_new if self.resume_step is None else self.resume_step
        kept = [row for row in self.earlier if row_step(row) < boundary]
        self.earlier = None
        self.metrics_keys = sorted({key for row in kept for key in row})
        if not kept:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a resumed stage (see
    :class:`ResumableExperimentWriter`); ``resume_step``: the step the stage resumes from (its checkpoint's
    ``global_step``; 0: it starts over), whose rows and later ones the resumed stage logs again."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableExperimentWriter:
        """The writer (made on first use, as Lightning's), keeping what an earlier attempt logged."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(self.log_dir, self.resume_step)
        return self._experiment


def checkpoint_step(path: Path | str) -> int:
    """The ``global_step`` a Lightning checkpoint file was saved at (memory-mapped: its tensors are not read)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def resume_kwargs(factory, resume_step: int | None) -> dict:
    """What a logger is told of the step a training stage starts from (None: not a training stage): kdpipe's
    CSV logger drops an earlier attempt's rows from there on; TensorBoard gets it as ``purge_step`` (its
    readers hide the earlier event files' records from that step on, as the resumed stage writes them again)."""
    if resume_step is None or not isinstance(factory, type):
        return {}
    if "resume_step" in inspect.signature(factory).parameters:
        return {"resume_step": resume_step}
    if any(cls.__name__ == "TensorBoardLogger" for cls in factory.__mro__):
        return {"purge_step": resume_step}
    return {}


def make_loggers(
    logger_cfg: DictConfig | None, run_dir: Path, stage_dir: Path, stage_name: str, resume_step: int | None = None
) -> list:
    """Instantiate the configured loggers for one stage (``stage_name``: its folder name, e.g. ``03_kd_fast``);
    ``resume_step``: a training stage's first step (its checkpoint's, or 0), see :func:`resume_kwargs`."""
    loggers = []
    for name, cfg in (logger_cfg or {}).items():
        if cfg is None or "_target_" not in cfg:
            continue
        own = {key: cfg[key] for key in OWN_KEYS if key in cfg}
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key not in OWN_KEYS])
        factory = hydra.utils.instantiate(cfg, _partial_=True)
        wandb = "Wandb" in str(cfg._target_)
        kwargs = logger_kwargs(wandb, name, run_dir, stage_dir, stage_name)
        accepted = inspect.signature(factory.func).parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        kwargs = {k: v for k, v in kwargs.items() if k in accepted or has_var_kw}
        logger = factory(**kwargs, **resume_kwargs(factory.func, resume_step))
        logger.kdpipe_generations_sample = int(own.get("generations_sample", GENERATIONS_SAMPLE))
        if wandb:
            prepare_wandb(logger, quiet=bool(own.get("quiet", True)))
        loggers.append(logger)
    return loggers


def prepare_wandb(logger, quiet: bool) -> None:
    """Remember the ``WANDB_*`` variables a wandb stage may change (finish_loggers puts them back) and, when
    ``quiet``, silence wandb for the stage (``WANDB_SILENT``, ``WANDB_CONSOLE``; ones you set yourself win)."""
    # Lightning passes wandb.init `anonymous=None`, a deprecated setting wandb warns about, even when silent
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    logger.kdpipe_prior_env = {key: os.environ.get(key) for key in WANDB_ENV}
    if quiet:
        for key, value in QUIET_WANDB.items():
            os.environ.setdefault(key, value)


@contextmanager
def stage_loggers(logger_cfg: DictConfig | None, run_dir: Path, stage_dir: Path, stage_name: str) -> Iterator[list]:
    """The loggers of a stage that runs no Trainer (eval, score, rollout), on global rank 0 only; finished
    when the block ends (as failed if it raised)."""
    loggers = make_loggers(logger_cfg, run_dir, stage_dir, stage_name) if is_rank_zero() else []
    status = "failed"
    try:
        yield loggers
        status = "success"
    finally:
        finish_loggers(loggers, status)


def sweep_job() -> dict:
    """``{"sweep": {"overrides", "job_num"}}`` when a Hydra multirun started this job (its overrides:
    ``hydra.overrides.task``), else ``{}``: a single run, or ``train(cfg)`` called where no HydraConfig is set
    (a notebook, a test)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.get("mode") != RunMode.MULTIRUN:
        return {}
    return {"sweep": {"overrides": list(hydra_cfg.overrides.task), "job_num": int(hydra_cfg.job.num)}}


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


def log_results(
    loggers: list, metrics: dict, step: int, evaluation: dict | None = None, generations: Path | None = None
) -> None:
    """What it scored, at the stage's last step: the evaluation's numbers under ``eval/`` (a None, such as an
    inapplicable accuracy, is left out) and its strings (``metric``, ``eval_split``...) as hyperparameters under
    ``eval``; the stage's other metrics under ``stage/``; a sample of ``generations`` (see
    :func:`log_generations`)."""
    evaluation = evaluation or {}
    rest = {key: value for key, value in metrics.items() if key not in evaluation}
    described = {"eval_data"}  # what was scored (source, file, split, fingerprint): config, not a metric
    scores = {key: value for key, value in evaluation.items() if key not in described}
    numbers = {**flat_numbers(rest, "stage/"), **flat_numbers(scores, "eval/")}
    strings = {key: value for key, value in evaluation.items() if isinstance(value, str) or key in described}
    for logger in loggers:
        if strings:
            logger.log_hyperparams({"eval": strings})
        logger.log_metrics(numbers, step=step)
    if generations is not None:
        log_generations(loggers, generations, step)


def sample_generations(path: Path, limit: int) -> tuple[list[str], list[list[str]]]:
    """The first ``limit`` records of a ``generations.jsonl``: its columns (every key of any of them, in order of
    first appearance) and one row of strings per record (a missing key or a None: ``""``)."""
    with Path(path).open() as lines:
        records = [json.loads(line) for line in itertools.islice(lines, limit) if line.strip()]
    columns = list(dict.fromkeys(key for record in records for key in record))

    def cell(value) -> str:
        return "" if value is None else value if isinstance(value, str) else json.dumps(value)

    return columns, [[cell(record.get(column)) for column in columns] for record in records]


def log_generations(loggers: list, path: Path, step: int) -> None:
    """The first ``generations_sample`` generations of the evaluation, per logger: a ``wandb.Table`` at
    ``eval/generations`` for wandb; ``<logger dir>/generations_sample.jsonl`` for the others that have a folder
    (csv, tensorboard), and for tensorboard also a text summary at ``eval/generations``."""
    if not Path(path).exists() or not is_rank_zero():
        return
    for logger in loggers:
        limit = getattr(logger, "kdpipe_generations_sample", GENERATIONS_SAMPLE)
        if limit <= 0:
            continue
        columns, rows = sample_generations(path, limit)
        if is_wandb(logger):
            logger.log_table(key="eval/generations", columns=columns, data=rows, step=step)
        elif getattr(logger, "log_dir", None):
            lines = [json.dumps(dict(zip(columns, row))) for row in rows]
            atomic_write_text(Path(logger.log_dir) / "generations_sample.jsonl", "".join(f"{x}\n" for x in lines))
            if type(logger).__name__ == "TensorBoardLogger":  # one record a line, as a markdown code block
                logger.experiment.add_text("eval/generations", "".join(f"    {x}\n" for x in lines), step)


def write_offline_files(run) -> None:
    """An offline wandb run keeps only its transaction log (``run-<id>.wandb``); an online one also leaves
    ``files/config.yaml`` and ``files/wandb-summary.json``. Write both (in wandb's layouts), so an offline run's
    config and summary can be read without syncing it (what ``wandb sync`` uploads comes from the log)."""
    files = Path(run.settings.files_dir)
    config = {key: {"value": value} for key, value in run.config.as_dict().items()}
    atomic_write_text(files / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    summary = run.summary._as_dict()  # plain values (the public mapping wraps nested dicts in its own type)
    atomic_write_text(files / "wandb-summary.json", json.dumps(summary, default=str) + "\n")


def where_wandb_logged(run) -> str | None:
    """The one line a wandb stage prints: the offline run's folder and how to upload it (every folder of the
    run's id: a resumed stage leaves one per attempt), or the online run's page; None for a disabled run."""
    if getattr(run, "disabled", False) or run.settings.mode == "disabled":
        return None
    if not run.offline:
        return f"wandb: run {run.url}"
    folder = Path(run.settings.sync_dir)
    attempts = sorted(folder.parent.glob(f"offline-run-*-{run.id}"))
    target = folder if len(attempts) <= 1 else folder.parent / f"offline-run-*-{run.id}"
    resumed = f" ({len(attempts)} folders of this run: a resumed stage)" if len(attempts) > 1 else ""
    return f"wandb: offline run in {folder}{resumed}; upload it with: wandb sync {target}"


def finish_wandb(logger) -> None:
    """Finish the stage's wandb run (after writing an offline run's config and summary files), put the
    ``WANDB_*`` variables back as the stage found them, tear wandb down, and print where the run is."""
    import wandb  # only when a wandb logger exists: wandb is slow to import

    run = wandb.run
    line = None if run is None else where_wandb_logged(run)
    try:
        if line is not None and run.offline:
            write_offline_files(run)
    finally:  # the run is finished and the variables put back even if the files could not be written
        wandb.finish()
        for key, prior in getattr(logger, "kdpipe_prior_env", {}).items():
            if prior is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = prior
        wandb.teardown()
    if line:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def finish_loggers(loggers: list, status: str = "success") -> None:
    """Close every logger; wandb runs are finished so the next stage (or multirun job) starts its own.

    ``WandbLogger(offline=True)`` sets ``WANDB_MODE`` for the rest of the process (and ``quiet`` sets
    ``WANDB_SILENT`` and ``WANDB_CONSOLE``), and wandb keeps the settings of its first run in a process-wide
    singleton: under Hydra's basic launcher every multirun job runs in the same process, so a later stage or
    job would silently get the first one's mode. The stage puts those variables back as it found them and tears
    wandb down, so the next run reads its own settings afresh."""
    for logger in loggers:
        logger.finalize(status)
        if is_wandb(logger):
            finish_wandb(logger)
