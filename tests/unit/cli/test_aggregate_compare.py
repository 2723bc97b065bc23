"""kdpipe-aggregate's paired comparisons on hand-made job folders: ``--baseline``, ``--pair`` and
``--compare-stages``, paired by seed, with the t interval over seeds, the bootstrap over the stages'
``generations.jsonl`` and the verdict. (Summaries without comparisons: test_aggregate.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdpipe.cli.aggregate import aggregate, main

N = 40  # test problems


def fake_job(sweep: Path, num: int, overrides: list[str], stages: dict[str, list[float]]) -> None:
    """A finished job whose stages each wrote a ``generations.jsonl`` (id, score per problem)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    entries = []
    for i, (name, scores) in enumerate(stages.items(), 1):
        stage_dir = job / f"{i:02d}_{name}"
        stage_dir.mkdir()
        lines = [json.dumps({"id": f"p{k}", "score": s, "reply": "..."}) + "\n" for k, s in enumerate(scores)]
        (stage_dir / "generations.jsonl").write_text("".join(lines))
        metrics = {"accuracy": sum(scores) / len(scores), "accuracy_by_level": {}}
        entries.append({"name": name, "kind": "kd", "model": "student", "dir": stage_dir.name, "status": "done",
                        "metrics": metrics})  # fmt: skip
    (job / "results.json").write_text(json.dumps({"stages": entries}))


def scores_for(seed: int) -> tuple[list[float], list[float]]:
    """The budget-matched control stage, and kd_fast: right wherever the control is, and on more problems."""
    rng = np.random.default_rng(seed)
    control = rng.random(N) < 0.5
    return [float(x) for x in control], [float(x) for x in control | (rng.random(N) < 0.4)]


def make_sweep(sweep: Path) -> dict[tuple[str, int], list[float]]:
    """random and competence with 5 seeds (competence: random's kd_fast with one problem flipped, up on odd
    seeds, down on even ones), sorted with 3 (only the first 10 problems can be right)."""
    kd_by_cell, num = {}, 0
    for cell, seeds in (("random", 5), ("competence", 5), ("sorted", 3)):
        for seed in range(1, seeds + 1):
            control, kd = scores_for(seed)
            if cell == "competence":
                flip = kd.index(0.0 if seed % 2 else 1.0)
                kd[flip] = 1.0 - kd[flip]
            elif cell == "sorted":
                kd = [s if k < 10 else 0.0 for k, s in enumerate(kd)]
                control = [s if k < 10 else 0.0 for k, s in enumerate(control)]
            fake_job(sweep, num, [f"curriculum={cell}", f"seed={seed}"], {"kd_fast_control": control, "kd_fast": kd})
            kd_by_cell[cell, seed] = kd
            num += 1
    return kd_by_cell


def test_baseline_and_stage_comparisons_paired_by_seed(tmp_path):
    kd = make_sweep(tmp_path)
    summary = aggregate(tmp_path, baseline="random", compare_stages=[("kd_fast", "kd_fast_control")], n_boot=2000)
    groups = {g["group"]: g for g in summary["groups"]}
    assert groups["curriculum=sorted"]["warning"] == "n=3 < 5" and groups["curriculum=random"]["warning"] == ""
    comps = {c["name"]: c for c in summary["comparisons"]}
    assert list(comps) == [
        "curriculum=competence - curriculum=random",
        "curriculum=sorted - curriculum=random",
        "curriculum=random: kd_fast - kd_fast_control",
        "curriculum=competence: kd_fast - kd_fast_control",
        "curriculum=sorted: kd_fast - kd_fast_control",
    ]
    # competence - random: +1, -1, +1, -1, +1 problems of 40 per seed: mean 0.005; squared deviations
    # 3 * 0.02^2 + 2 * 0.03^2 = 0.003, sd sqrt(0.003 / 4) = 0.027386, half t(0.975, 4) * sd / sqrt(5) = 0.034004
    even = comps["curriculum=competence - curriculum=random"]
    assert even["paired"]["seeds"] == ["seed=1", "seed=2", "seed=3", "seed=4", "seed=5"]
    assert even["paired"]["differences"] == pytest.approx([0.025, -0.025, 0.025, -0.025, 0.025])
    ci = even["paired"]["ci"]
    assert ci["mean"] == pytest.approx(0.005) and ci["std"] == pytest.approx(0.027386, abs=1e-6)
    assert ci["half_width"] == pytest.approx(0.034004, abs=1e-6)
    assert even["bootstrap"]["n_problems"] == N and even["bootstrap"]["mean"] == pytest.approx(0.005)
    assert even["bootstrap"]["low"] <= 0 <= even["bootstrap"]["high"] and even["verdict"] == "inconclusive"
    # sorted - random: 3 pairs (random's seeds 4 and 5 have no partner), far below 0 on both intervals
    worse = comps["curriculum=sorted - curriculum=random"]
    expected = [np.mean(kd["sorted", s]) - np.mean(kd["random", s]) for s in (1, 2, 3)]
    assert worse["paired"]["differences"] == pytest.approx(expected) and worse["unpaired"] == ["seed=4", "seed=5"]
    assert worse["paired"]["ci"]["high"] < 0 and worse["bootstrap"]["high"] < 0 and worse["verdict"] == "worse"
    # kd_fast against its control, the same jobs: kd_fast is never worse on a problem
    for cell in ("random", "competence"):
        gain = comps[f"curriculum={cell}: kd_fast - kd_fast_control"]
        assert gain["paired"]["ci"]["low"] > 0 and gain["bootstrap"]["low"] > 0 and gain["verdict"] == "better"
        assert gain["bootstrap"]["mean"] == pytest.approx(gain["paired"]["ci"]["mean"])
    table = (tmp_path / "summary.md").read_text()
    assert "| curriculum=sorted | 3 |" in table and "| n=3 < 5 |" in table
    assert "| curriculum=sorted - curriculum=random | 3 |" in table
    assert "| worse | n=3 < 5; unpaired: seed=4, seed=5 |" in table
    assert f"| {100 * ci['mean']:+.1f} ± 2.7 | [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}] | 40 |" in table
    assert json.loads((tmp_path / "summary.json").read_text())["comparisons"] == summary["comparisons"]
    for plot in ("summary.png", "summary_ci.png", "comparisons.png"):
        assert (tmp_path / plot).stat().st_size > 0
    again = aggregate(tmp_path, baseline="random", compare_stages=[("kd_fast", "kd_fast_control")], n_boot=2000)
    assert again["comparisons"] == summary["comparisons"]  # the bootstrap is seeded


def test_pairs_on_the_command_line_and_stages_without_generations(tmp_path, capsys):
    make_sweep(tmp_path)
    for job in (tmp_path / str(n) for n in range(10, 13)):  # sorted's jobs: an lm-eval style stage, no records
        shutil.rmtree(job / "02_kd_fast")
    args = [str(tmp_path), "--pair", "competence", "curriculum=sorted", "--n-boot", "500"]
    assert main([*args, "--compare-stages", "kd_fast,kd_fast_control"]) == 0
    out = capsys.readouterr().out
    assert "paired differences" in out and "fewer than 5 seeds" in out and "comparisons.png" in out
    comps = {c["name"]: c for c in json.loads((tmp_path / "summary.json").read_text())["comparisons"]}
    pair = comps["curriculum=competence - curriculum=sorted"]
    assert pair["bootstrap"] is None and pair["paired"]["ci"]["n"] == 3 and pair["verdict"] == "better"
    assert "no generations.jsonl" in (tmp_path / "summary.md").read_text()


def test_comparison_errors_name_the_cells(tmp_path, capsys):
    make_sweep(tmp_path)
    assert main([str(tmp_path), "--baseline", "nope"]) == 2
    assert "--baseline nope: matches no cell; the cells: curriculum=random" in capsys.readouterr().err
    assert main([str(tmp_path), "--compare-stages", "kd_fast,sft"]) == 2
    assert "no stage 'sft'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--compare-stages", "kd_fast"])
    assert "expected two stage names as A,B" in capsys.readouterr().err
