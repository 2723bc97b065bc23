"""One clean line per user error, as a user sees it: ``kdpipe-train`` (and ``kdpipe-eval``) in subprocesses exit
with 2, their first stderr line ``kdpipe-<cmd>: <kind> error: ...`` names the cause, no traceback, and a
refused command leaves no run folder. A single-stage run with ``logger=none`` and bad records skipped checks
the default callbacks without a logger and the list of skipped records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kdpipe.data.arith import generate_split
from tests.helpers import TinyConfig, chat_data_overrides, run_cli, write_records

ONE_STAGE = ("pipeline.order=[sft_fast]", "pipeline.stages.sft_fast.eval.limit=4")


def refused(proc, kind: str, cause: str) -> str:
    """Assert exit status 2, a first stderr line of ``kind`` naming ``cause``, no traceback; the first line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(rf"kdpipe-\w+: {kind} error: ", lines[0]), lines[0]
    assert cause in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def run_folders(root: Path) -> list[Path]:
    runs = root / "logs" / "runs"
    return sorted(runs.iterdir()) if runs.exists() else []


def test_a_data_error_is_one_line_and_leaves_no_run_folder(tiny_cfg, tmp_path):
    bad = write_records(tmp_path / "bad.jsonl", [{"prompt": "2+2?", "response": "Answer: 4"}, '{"prompt": "x", '])
    proc = run_cli("kdpipe-train", *tiny_cfg.args(*chat_data_overrides(bad)), cwd=tmp_path, check=False)
    refused(proc, "(data|config)", f"{bad}:2:17: invalid JSON")  # the preflight may gather it as a config error
    assert run_folders(tmp_path) == []


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_an_unknown_key_is_refused_naming_the_closest_one(tiny_cfg, tmp_path):
    # Hydra alone runs `+sed=3` with the default seed (and answers `sed=3` with a paragraph: tests/unit/cli)
    proc = run_cli("kdpipe-train", *tiny_cfg.args("+sed=3"), cwd=tmp_path, check=False)
    first = refused(proc, "config", "sed")
    assert first == "kdpipe-train: config error: unknown key 'sed' (did you mean 'seed'?)"
    assert not (tmp_path / "logs").exists()  # refused before Hydra made a run folder


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_a_command_refused_after_hydra_made_its_folder_removes_it(tiny_cfg, tmp_path):
    proc = run_cli("kdpipe-train", *tiny_cfg.args(f"resume={tmp_path / 'missing'}"), cwd=tmp_path, check=False)
    refused(proc, "config", "does not exist")
    assert run_folders(tmp_path) == []


@pytest.mark.slow  # a subprocess each (~11 s); make test-all
def test_an_output_root_that_cannot_be_made_is_one_line(tiny_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_cli("kdpipe-train", *tiny_cfg.args(f"paths.root_dir={blocker}"), cwd=tmp_path, check=False)
    refused(proc, "file", f"Not a directory: '{blocker}")  # Hydra's own mkdir of the run folder


@pytest.mark.slow  # a subprocess each (~11 s); make test-all
def test_lightning_refusing_a_setting_is_a_config_error(tiny_cfg, tmp_path):
    proc = run_cli("kdpipe-train", *tiny_cfg.args(*ONE_STAGE, "trainer.devices=0"), cwd=tmp_path, check=False)
    first = refused(proc, "config", "Trainer(devices=0)")
    assert first.startswith("kdpipe-train: config error: Lightning: ")


@pytest.fixture(scope="module")
def skipping_run(tmp_path_factory) -> tuple[Path, Path]:
    """One training stage with ``logger=none`` and the default callbacks, on data with 3 bad records per split
    (``data.on_error=skip``); returns (the run folder, the data file)."""
    root = tmp_path_factory.mktemp("skipping")
    good = [{"id": f"q{i}", "prompt": f"{i}+1?", "response": f"Answer: {i + 1}", "answer": i + 1} for i in range(6)]
    data = write_records(root / "data.jsonl", [*good, "{oops", {"prompt": "x", "response": 3}, {"response": "y"}])
    args = TinyConfig(root).args(*ONE_STAGE, *chat_data_overrides(data), "data.on_error=skip")
    run_cli("kdpipe-train", *args, "logger=none", "callbacks=default", cwd=root)
    (run,) = run_folders(root)
    return run, data


def test_logger_none_trains_with_the_default_callbacks(skipping_run):
    run, _ = skipping_run
    assert (run / "01_sft_fast" / "export").is_dir()  # LearningRateMonitor left out: it needs a logger


def test_every_skipped_record_of_every_split_is_written_and_counted(skipping_run):
    run, data = skipping_run
    lines = (run / "01_sft_fast" / "skipped_records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["split"] for r in records] == ["train"] * 3 + ["val"] * 3 + ["test"] * 3
    assert [r["where"] for r in records[:3]] == [f"{data}:7:2", f"{data}:8", f"{data}:9"]
    metrics = json.loads((run / "01_sft_fast" / "metrics.json").read_text())["metrics"]
    assert metrics["skipped_invalid"] == 3
    assert metrics["skipped_invalid_by_split"] == {"train": 3, "val": 3, "test": 3}


@pytest.mark.slow  # a subprocess each (~11 s); make test-all
def test_resuming_a_run_leaves_no_new_run_folder(skipping_run):
    run, _ = skipping_run
    root = run.parents[2]
    run_cli("kdpipe-train", f"paths.root_dir={root}", f"resume={run}", "print_config=false", cwd=root)
    assert run_folders(root) == [run]  # Hydra's folder for the resuming command is gone; the run is there


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_kdpipe_eval_writes_no_run_folder(tmp_path):
    examples = generate_split("test", 1, seed=0)
    replies = [{"id": e["id"], "response": e["responses"]["fast"]} for e in examples]
    predictions = write_records(tmp_path / "replies.jsonl", replies)
    run_cli("kdpipe-eval", f"predictions={predictions}", "data=arith", "data.n_test_per_level=1", cwd=tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["replies.eval_test.json", "replies.eval_test.jsonl", "replies.jsonl"]  # no logs/, no eval.log
