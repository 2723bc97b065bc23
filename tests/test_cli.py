"""The console scripts as a user runs them: kdpipe-train and kdpipe-eval in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdpipe.data.arith import generate_split

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDPIPE_ROOT": str(cwd), "WANDB_SILENT": "true"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny pipeline run through the real entry point, with the default (offline wandb) logger."""
    root = tmp_path_factory.mktemp("cli")
    proc = run([str(BIN / "kdpipe-train"), "debug=fast", "logger=wandb", "pipeline.order=[teacher_sft,sft_fast]"], root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((root / "logs" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_train_cli_prints_table_and_writes_offline_wandb(trained_run):
    assert (trained_run / "results.md").exists()
    offline = list((trained_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2  # one wandb run per training stage, nothing sent
    assert (trained_run / ".hydra" / "config.yaml").exists()


def test_eval_cli_evaluates_a_stage_export(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run(
        [
            str(BIN / "kdpipe-eval"),
            f"model_path={trained_run / '02_sft_fast' / 'export'}",
            "data.n_test_per_level=3",
            "style=fast",
            f"output={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["num_examples"] == len(generate_split("test", 3))
    assert {"accuracy", "accuracy_by_level", "mean_response_tokens", "loss"} <= set(metrics)
    assert out.with_suffix(".jsonl").exists()


def test_train_cli_bad_input_exits_with_a_clear_message(tmp_path):
    proc = run([str(BIN / "kdpipe-train"), "debug=fast", "pipeline.order=[nope]"], tmp_path)
    assert proc.returncode == 2
    assert "unknown stage 'nope'" in proc.stderr
    proc = run([str(BIN / "kdpipe-train"), "debug=fast", f"resume={tmp_path / 'missing'}"], tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_eval_cli_missing_model_dir(tmp_path):
    proc = run([str(BIN / "kdpipe-eval"), f"model_path={tmp_path / 'none'}"], tmp_path)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


def test_cache_cli_scores_a_teacher_export_and_reuses_the_store(trained_run, tmp_path):
    teacher = trained_run / "01_teacher_sft" / "export"
    cmd = [
        str(BIN / "kdpipe-cache"),
        f"teacher_path={teacher}",
        "data.n_train_per_level=5",
        "score.k=8",
        "score.styles=[fast]",
        f"score.store_root={tmp_path / 'stores'}",
    ]
    first = run(cmd, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    stores = [p for p in (tmp_path / "stores").iterdir() if not p.name.startswith(".")]  # not the lock file
    assert len(stores) == 1 and (stores[0] / "manifest.json").exists()
    again = run(cmd, tmp_path)
    assert again.returncode == 0 and "reused" in again.stdout
    missing = run([str(BIN / "kdpipe-cache"), f"teacher_path={tmp_path / 'nope'}"], tmp_path)
    assert missing.returncode == 2 and "not a directory" in missing.stderr
