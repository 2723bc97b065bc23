"""kdpipe-aggregate on hand-made job folders: grouping multirun jobs, mean and std per level, sweeps finished in
parts, errors. (Paired comparisons: test_aggregate_compare.py; on a real multirun:
tests/integration/test_aggregate.py.)"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from kdpipe.cli.aggregate import aggregate, main


def fake_job(sweep: Path, num: int, overrides: list[str], accuracy: float, by_level: dict[str, float]) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {"accuracy": accuracy, "accuracy_by_level": by_level, "train_seconds": 10.0 + num,
               "mean_response_tokens": 20.0 + num}  # fmt: skip
    stages = [{"name": "sft_reasoning", "kind": "sft", "model": "student", "dir": "01_sft_reasoning",
               "status": "done", "metrics": metrics}]  # fmt: skip
    (job / "results.json").write_text(json.dumps({"stages": stages}))


def test_jobs_are_grouped_by_what_varies_and_summarised_over_seeds(tmp_path):
    accuracies = {("random", 1): 0.9, ("random", 2): 0.8, ("random", 3): 0.85, ("sorted", 1): 0.2, ("sorted", 2): 0.3}
    for num, ((curriculum, seed), acc) in enumerate(accuracies.items()):
        overrides = [f"curriculum={curriculum}", f"seed={seed}", "experiment=curriculum_ablation"]
        fake_job(tmp_path, num, overrides, acc, {"1": acc + 0.05, "2": acc - 0.05})
    (tmp_path / "9" / ".hydra").mkdir(parents=True)  # a job that crashed: reported, not averaged
    fake_job(tmp_path, 8, ["curriculum=sorted", "seed=3", "experiment=curriculum_ablation"], 0.99, {"1": 0.99})
    in_progress = json.loads((tmp_path / "8" / "results.json").read_text())
    in_progress["stages"].append({"name": "eval_student", "status": "running", "metrics": {}})
    (tmp_path / "8" / "results.json").write_text(json.dumps(in_progress))  # a job still running: not averaged
    summary = aggregate(tmp_path)
    groups = {g["group"]: g for g in summary["groups"]}
    assert list(groups) == ["curriculum=random", "curriculum=sorted"]  # the constant experiment= is no group
    random_acc = [0.9, 0.8, 0.85]
    assert groups["curriculum=random"]["accuracy"]["mean"] == pytest.approx(statistics.fmean(random_acc))
    assert groups["curriculum=random"]["accuracy"]["std"] == pytest.approx(statistics.stdev(random_acc))
    assert groups["curriculum=sorted"]["accuracy_by_level"]["2"]["mean"] == pytest.approx(0.2)
    assert groups["curriculum=sorted"]["accuracy"]["n"] == 2
    assert summary["unfinished"] == ["8", "9"]
    table = (tmp_path / "summary.md").read_text()
    # 95% CI: 85.0 ± t(0.975, 2) * 5.0 / sqrt(3) = 85.0 ± 12.4; 3 seeds is under the protocol's 5
    assert (
        "| curriculum=random | 3 | 85.0 ± 5.0 | [72.6, 97.4] | 90.0 ± 5.0 | 80.0 ± 5.0 | 21.0 | 11 | n=3 < 5 |" in table
    )
    assert groups["curriculum=random"]["accuracy"]["low"] == pytest.approx(0.85 - 4.302653 * 0.05 / 3**0.5)
    assert (tmp_path / "summary.png").stat().st_size > 0 and (tmp_path / "summary_ci.png").stat().st_size > 0
    assert summary["comparisons"] == [] and not (tmp_path / "comparisons.png").exists()
    # grouping by seed instead, over the curricula
    by_seed = aggregate(tmp_path, over=("curriculum",))
    assert [g["group"] for g in by_seed["groups"]] == ["seed=1", "seed=2", "seed=3"]


def test_a_numeric_override_is_plotted_as_lines(tmp_path):
    for num, (method, fraction, seed) in enumerate(
        (m, f, s) for m in ("sft_r", "kd_r") for f in ("0.1", "1.0") for s in (1, 2)
    ):
        acc = float(fraction) / 2 + (0.2 if method == "kd_r" else 0.0) + 0.01 * seed
        fake_job(tmp_path, num, [f"pipeline/preset={method}", f"data_fraction={fraction}", f"seed={seed}"], acc, {})
    summary = aggregate(tmp_path, x_key="data_fraction")
    assert len(summary["groups"]) == 4
    kd_small = next(
        g for g in summary["groups"] if g["overrides"] == {"data_fraction": "0.1", "pipeline/preset": "kd_r"}
    )
    assert kd_small["accuracy"]["mean"] == pytest.approx(0.05 + 0.2 + 0.015)
    assert (tmp_path / "summary.png").stat().st_size > 0
    with pytest.raises(KeyError, match="--x seed"):
        aggregate(tmp_path, x_key="seed")


def test_a_sweep_finished_in_two_parts_is_pooled_and_reruns_replace(tmp_path, capsys):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    fake_job(first, 0, ["data_fraction=0.1", "seed=1", "print_config=False", "hydra/launcher=basic"], 0.1, {})
    fake_job(first, 1, ["data_fraction=0.1", "seed=2"], 0.3, {})
    (first / "2" / ".hydra").mkdir(parents=True)  # killed mid-run ...
    (first / "2" / ".hydra" / "overrides.yaml").write_text("- data_fraction=1.0\n- seed=1\n")
    fake_job(second, 0, ["data_fraction=1.0", "seed=1"], 0.7, {})  # ... and rerun in a second sweep
    fake_job(second, 1, ["data_fraction=1.0", "seed=2"], 0.9, {})
    fake_job(second, 2, ["data_fraction=0.1", "seed=2"], 0.5, {})  # a rerun replaces the first sweep's job
    assert main([str(first), str(second), "--x", "data_fraction", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    means = {g["group"]: g["accuracy"]["mean"] for g in summary["groups"]}
    assert means == pytest.approx({"data_fraction=0.1": 0.3, "data_fraction=1.0": 0.8})
    assert summary["unfinished"] == []  # the killed job was finished by the second sweep
    assert summary["sweep_dir"] == [str(first), str(second)]
    assert (out / "summary.png").stat().st_size > 0 and not (first / "summary.json").exists()
    assert "summary.md" in capsys.readouterr().out.replace("\n", "")


def test_aggregate_errors_name_the_folder_and_stage(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no job folder has a results.json" in capsys.readouterr().err
    fake_job(tmp_path, 0, ["seed=1"], 0.5, {"1": 0.5})
    assert main([str(tmp_path), "--stage", "kd_fast"]) == 2
    assert "no stage 'kd_fast'" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 0  # one job: no spread and no interval, never ± 0
    assert "| all | 1 | 50.0 | n/a | 50.0 | 20.0 | 10 | n=1 < 5 |" in (tmp_path / "summary.md").read_text()


def test_an_evaluation_stage_has_no_train_time_and_shows_none(tmp_path):
    for num in range(2):
        fake_job(tmp_path, num, [f"seed={num}"], 0.5, {"1": 0.5})
        payload = json.loads((tmp_path / str(num) / "results.json").read_text())
        del payload["stages"][0]["metrics"]["train_seconds"]  # as an eval stage reports
        (tmp_path / str(num) / "results.json").write_text(json.dumps(payload))
    summary = aggregate(tmp_path)
    assert summary["groups"][0]["train_seconds"] is None
    assert "| 20.5 | - | n=2 < 5 |" in (tmp_path / "summary.md").read_text()  # never a 0 that was not measured
