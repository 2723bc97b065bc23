"""No empty run folder left behind: Hydra creates ``logs/runs/<date>_<time>/`` (its ``.hydra/`` config copy and
the job log) before ``kdpipe-train`` runs anything. When the command ends with that folder holding nothing
else (it was refused before any stage ran, or it resumed another run's folder), the folder goes.

A folder is removed only when every entry is one of :data:`RUN_FILES` (never a stage folder) and every file in
it was written by this process (modified since it started): a folder of the user's, or a run, stays.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdpipe.pipeline.state import STATE_FILE

STARTED = time.time()  # when this command started (imported it): files older than that are not its own
# what a run folder holds before its first stage: Hydra's config copy and the command's saved config and state
RUN_FILES = {".hydra", "config.yaml", "config_tree.log", STATE_FILE, ".run.lock"}
SLACK_S = 2.0  # file times may be coarser than the clock


def is_stray(run_dir: Path, since: float, job_log: str) -> bool:
    """Whether ``run_dir`` holds only what a command writes before any stage (:data:`RUN_FILES`, the job log),
    all of it written since ``since`` (a ``time.time()``)."""
    if not run_dir.is_dir() or run_dir.resolve() in (Path.cwd(), *Path.cwd().parents):
        return False  # hydra.run.dir=.: the folder the user works in
    if any(entry.name not in {*RUN_FILES, job_log} for entry in run_dir.iterdir()):
        return False
    files = [run_dir, *(p for p in run_dir.rglob("*") if p.is_file())]  # an empty folder: made now, or kept
    return all(p.stat().st_mtime >= since - SLACK_S for p in files)


def keep_job_log(stray: Path, job_log: str, resumed: Path) -> None:
    """Append this command's job log to the log of the run it resumed (which holds the earlier attempts')."""
    log = stray / job_log
    if log.is_file() and log.stat().st_size and resumed.is_dir():
        with open(resumed / job_log, "a") as out:
            out.write(log.read_text())


def remove_if_stray(run_dir: Path, since: float, job_log: str, resumed: Path | None = None) -> bool:
    """Remove ``run_dir`` when :func:`is_stray` (keeping its job log in the ``resumed`` run); True if it went."""
    if resumed is not None and run_dir.resolve() == resumed.resolve():
        return False  # the run being resumed: never
    if not is_stray(run_dir, since, job_log):
        return False
    if resumed is not None:
        keep_job_log(run_dir, job_log, resumed)
    shutil.rmtree(run_dir, ignore_errors=True)  # several ranks may remove the same folder
    return not run_dir.exists()


@contextmanager
def removing_stray_run_dir(cfg: DictConfig, since: float) -> Iterator[None]:
    """Run the body, then (whatever it ended with) remove Hydra's run folder if nothing but the command's own
    files are in it. Only a single run's folder: a multirun job's stays for ``kdpipe-aggregate`` to report."""
    try:
        yield
    finally:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
            hydra = HydraConfig.get()
            resumed = Path(str(cfg.resume)).expanduser() if cfg.get("resume") not in (None, "auto") else None
            remove_if_stray(Path(hydra.runtime.output_dir), since, f"{hydra.job.name}.log", resumed)
