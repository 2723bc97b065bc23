"""What a logger keeps of an interrupted attempt's records: the csv rows before the step a stage resumes
from, TensorBoard's ``purge_step``; loggers that know neither are not told."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from kdpipe.lightning.loggers import ResumableCSVLogger, resume_kwargs


def log_steps(log_dir: Path, steps: range, resume_step: int | None = None, key: str = "loss") -> None:
    """One attempt of a stage: ``key`` logged at ``steps`` into ``log_dir/logs/csv``, then saved."""
    logger = ResumableCSVLogger(log_dir, name="logs", version="csv", resume_step=resume_step)
    for step in steps:
        logger.log_metrics({key: float(step)}, step=step)
    logger.finalize("success")


def rows(log_dir: Path) -> list[dict]:
    with (log_dir / "logs" / "csv" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_a_resumed_csv_logger_keeps_the_rows_before_its_resume_step_and_adds_new_columns(tmp_path):
    log_steps(tmp_path, range(6))  # interrupted after step 5, its checkpoint at step 3
    log_steps(tmp_path, range(3, 8), resume_step=3, key="val")  # steps 3-5 logged again, a new column
    found = rows(tmp_path)
    assert [int(row["step"]) for row in found] == list(range(8))
    assert [row["loss"] for row in found] == ["0.0", "1.0", "2.0", "", "", "", "", ""]
    assert [row["val"] for row in found[3:]] == ["3.0", "4.0", "5.0", "6.0", "7.0"]


def test_without_a_resume_step_the_rows_from_the_first_step_logged_again_are_replaced(tmp_path):
    log_steps(tmp_path, range(4))
    log_steps(tmp_path, range(2, 5))
    assert [int(row["step"]) for row in rows(tmp_path)] == [0, 1, 2, 3, 4]


def test_a_stage_starting_over_replaces_every_earlier_row_and_one_logging_nothing_keeps_them(tmp_path):
    log_steps(tmp_path, range(4))
    log_steps(tmp_path, range(0), resume_step=0)  # nothing logged: the file stays as it was
    assert len(rows(tmp_path)) == 4
    log_steps(tmp_path, range(2), resume_step=0)
    assert [int(row["step"]) for row in rows(tmp_path)] == [0, 1]


def test_only_loggers_that_take_a_resume_step_are_given_one():
    assert resume_kwargs(ResumableCSVLogger, 4) == {"resume_step": 4}
    assert resume_kwargs(TensorBoardLogger, 4) == {"purge_step": 4}
    assert resume_kwargs(CSVLogger, 4) == resume_kwargs(WandbLogger, 4) == {}  # Lightning's own: as before
    assert resume_kwargs(ResumableCSVLogger, None) == {}  # not a training stage
