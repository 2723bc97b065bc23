"""Nothing a stage recorded is lost when it is interrupted and resumed: its csv and TensorBoard history hold
every step once, as an uninterrupted run's do; its wandb run keeps its id; its throughput counters and
training seconds count the interrupted attempt's work too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from kdpipe.cli.train import train
from tests.helpers import TinyConfig, cli_env, crash_override

STAGE = "01_sft_reasoning"
# one short training stage, checkpointed every 2 steps, logging every step, no evaluation (its rows are the
# stage's last: stage/*); csv and TensorBoard at once
OVERRIDES = (
    "pipeline.order=[sft_reasoning]",
    "pipeline.stages.sft_reasoning.checkpoint_every_n_steps=2",
    "pipeline.stages.sft_reasoning.eval.enabled=false",
    "trainer.log_every_n_steps=1",
    "logger=[csv,tensorboard]",
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The stage run once without interruption (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("reference")
    train(TinyConfig(root)(*OVERRIDES, run_dir=root / "run"))
    return root / "run" / STAGE


def crash_and_resume(tiny_cfg, tmp_path: Path, step: int) -> tuple[Path, dict]:
    """Run the stage with a crash at ``step``, then resume it; its folder and the counters its checkpoint
    held when it crashed (with the checkpoint's ``global_step``)."""
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*OVERRIDES, crash_override("sft_reasoning", step, tmp_path / "marker"), run_dir=crashed))
    ckpt = torch.load(crashed / STAGE / "checkpoints" / "last.ckpt", weights_only=True)  # plain numbers only
    train(tiny_cfg(f"resume={crashed}"))
    return crashed / STAGE, {**ckpt["kdpipe_counters"], "global_step": ckpt["global_step"]}


def csv_rows(stage: Path) -> list[tuple[int, tuple[str, ...]]]:
    """``(step, metrics logged)`` per row of the stage's ``metrics.csv``, in order."""
    with (stage / "logs" / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    return [(int(row["step"]), tuple(sorted(k for k, v in row.items() if v and k != "step"))) for row in rows]


def event_steps(stage: Path) -> dict[str, list[int]]:
    """The steps of every training and validation scalar of the stage's TensorBoard run, as TensorBoard
    reads them (every event file of the folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stage / "logs" / "tensorboard"))
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith(("train/", "val/", "stage/"))]
    return {tag: [event.step for event in events.Scalars(tag)] for tag in tags}


def stage_metrics(stage: Path) -> dict:
    return json.loads((stage / "metrics.json").read_text())["metrics"]


# crash at 4: the checkpoint of step 2 is older than the rows of steps 2 and 3 (logged again on resume);
# crash at 5: the checkpoint of step 4 is older than step 3's validation (not run again)
@pytest.mark.parametrize("crash_step", [4, 5])
def test_a_resumed_stage_keeps_its_logged_history_once_and_counts_all_its_work(
    reference, tiny_cfg, tmp_path, crash_step
):
    resumed, saved = crash_and_resume(tiny_cfg, tmp_path, crash_step)
    assert csv_rows(resumed) == csv_rows(reference)  # every row once, in order, with the same metrics
    assert event_steps(resumed) == event_steps(reference)
    assert event_steps(resumed)["train/loss"] == list(range(8))
    ours, theirs = stage_metrics(resumed), stage_metrics(reference)
    for key in ("steps", "tokens_trained", "batches_trained"):
        assert ours[key] == theirs[key], key
    assert saved["batches_trained"] == saved["global_step"] > 0  # the batch the checkpoint was saved in counted
    assert ours["train_seconds"] > saved["train_seconds"] > 0  # the interrupted attempt's seconds included


def test_a_resumed_wandb_stage_leaves_two_offline_folders_of_one_run_id(tiny_cfg, tmp_path, monkeypatch):
    for key, value in cli_env(tmp_path).items():
        if key.startswith("WANDB_"):  # wandb's own folders in the test's tmp dir
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    crash = crash_override("sft_fast", 4, tmp_path / "marker")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg("logger=wandb", "pipeline.order=[sft_fast]", crash))
    train(tiny_cfg(f"resume={run_dir}"))
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # offline wandb cannot resume a run: one folder per attempt (docs/pipeline.md)
    (run_id,) = {folder.name.split("-", 3)[-1] for folder in folders}  # offline-run-<time>-<id>: one id
    assert run_id.endswith("-01_sft_fast")
    for folder in folders:  # each attempt's transaction log records the run under that id
        (log,) = folder.glob("run-*.wandb")
        assert log.name == f"run-{run_id}.wandb" and run_id.encode() in log.read_bytes()
        config = yaml.safe_load((folder / "files" / "config.yaml").read_text())
        assert config["stage"]["value"]["name"] == "sft_fast"  # written by kdpipe for a failed attempt too
    summary = json.loads((folders[-1] / "files" / "wandb-summary.json").read_text())
    assert summary["stage/batches_trained"] == 6  # the resumed attempt counts the interrupted one's batches
