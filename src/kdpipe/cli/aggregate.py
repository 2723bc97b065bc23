"""``kdpipe-aggregate``: summarise a Hydra multirun (e.g. ``experiment=curriculum_ablation``).

kdpipe-aggregate logs/multiruns/2026-11-23_13-42-46              # group by what the sweep varied, over seeds
kdpipe-aggregate logs/multiruns/<dir> --over seed --stage sft_reasoning
kdpipe-aggregate logs/multiruns/<dir> --x data_fraction                # accuracy against a numeric override
kdpipe-aggregate logs/multiruns/<dir1> logs/multiruns/<dir2>          # a sweep finished in two parts

Several folders are pooled (a sweep whose unfinished jobs were rerun with narrower overrides); a job whose
overrides repeat an earlier folder's job replaces it, and the summary goes to the first folder (or ``--out``).

Every job folder's ``results.json`` is read; jobs are grouped by the overrides that differ between jobs,
leaving out the ``--over`` keys (default: ``seed``), which become the repeats. For one stage (default: the
last evaluated one) it writes ``summary.json``, ``summary.md`` (mean ± std of accuracy, overall and per
level, with each cell's 95% Student-t interval and a warning under 5 seeds), ``summary.png`` (the same as bars
with error bars) and ``summary_ci.png`` (each cell's mean and 95% interval) into the sweep folder, and prints
the table.

Paired comparisons, ``a - b`` per seed (same seed, same data order), each with the t interval over seeds, the
paired bootstrap interval over test problems (from the stages' ``generations.jsonl``) and a verdict, go to
the same files and ``comparisons.png``:

kdpipe-aggregate logs/multiruns/<dir> --baseline curriculum=random     # every other cell minus this one
kdpipe-aggregate logs/multiruns/<dir> --pair kd_r sft_r                # one cell minus another (repeatable)
kdpipe-aggregate logs/multiruns/<dir> --compare-stages kd_fast,kd_fast_control   # two stages of each job
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from rich.console import Console

from kdpipe.cli.aggregate_compare import Cell, Comparison, compare, comparison_rows, problem_scores, resolve_cell
from kdpipe.cli.aggregate_plots import plot_cell_cis, plot_differences, plot_lines, plot_summary
from kdpipe.cli.errors import report_user_error
from kdpipe.utils.io import atomic_write_json, atomic_write_text, read_json
from kdpipe.utils.stats import MIN_SEEDS, mean_ci, seed_warning
from kdpipe.utils.tables import markdown_table, rich_table

console = Console(width=None if sys.stdout.isatty() else 160)  # piped to a log: do not wrap at 80


@dataclass
class Job:
    """One multirun job: its folder, its command-line overrides and its ``results.json``."""

    dir: Path
    overrides: dict[str, str]
    results: dict


def _job_key(path: Path):
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


# overrides that do not change what a job computes: never a group, never part of a job's identity
IGNORED_KEYS = ("print_config", "hydra.", "hydra/")


def read_overrides(job_dir: Path) -> dict[str, str]:
    """The job's ``key=value`` overrides from Hydra's ``.hydra/overrides.yaml`` ({} when it has none), less
    the :data:`IGNORED_KEYS` (console output, Hydra's own settings such as the launcher)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    overrides = {}
    for line in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(line).partition("=")
        key = key.lstrip("+~")
        if not any(key == k or (k.endswith((".", "/")) and key.startswith(k)) for k in IGNORED_KEYS):
            overrides[key] = value
    return overrides


def load_jobs(sweep_dir: Path) -> tuple[list[Job], list[Path]]:
    """Finished jobs under ``sweep_dir`` (a ``results.json`` whose every stage is done), and the others (no
    ``results.json`` yet, or stages still to run: a job in progress, or stopped, whose resume would finish it)."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory (expected a Hydra multirun folder)")
    jobs, unfinished = [], []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_job_key):
        results = job_dir / "results.json"
        payload = read_json(results) if results.exists() else None
        if payload is not None and all(s.get("status", "done") == "done" for s in payload.get("stages") or []):
            jobs.append(Job(job_dir, read_overrides(job_dir), payload))
        elif payload is not None or (job_dir / ".hydra").exists() or (job_dir / "config.yaml").exists():
            unfinished.append(job_dir)
    return jobs, unfinished


def group_jobs(jobs: list[Job], over: tuple[str, ...] = ("seed",)) -> dict[str, list[Job]]:
    """Jobs grouped by the overrides that vary between jobs, except the ``over`` keys (the repeats)."""
    keys = sorted({k for job in jobs for k in job.overrides})
    varying = [k for k in keys if k not in over and len({job.overrides.get(k) for job in jobs}) > 1]
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        label = " ".join(f"{k}={job.overrides.get(k, '-')}" for k in varying) or "all"
        groups.setdefault(label, []).append(job)
    return groups


def stage_entry(job: Job, stage: str | None) -> dict:
    """The ``results.json`` record (``name``, ``dir``, ``metrics``, ...) of the named stage (default: the last
    stage that reports ``accuracy``)."""
    stages = job.results.get("stages") or []
    if stage is not None:
        named = [s for s in stages if s["name"] == stage]
        if not named:
            raise KeyError(f"{job.dir / 'results.json'}: no stage {stage!r} (has {[s['name'] for s in stages]})")
        if named[-1]["metrics"].get("accuracy") is None:
            metric = named[-1]["metrics"].get("metric")
            raise KeyError(f"{job.dir / 'results.json'}: stage {stage!r} reports no accuracy (its metric: {metric})")
        return named[-1]
    evaluated = [s for s in stages if s["metrics"].get("accuracy") is not None]
    if not evaluated:
        raise KeyError(f"{job.dir / 'results.json'}: no stage reports accuracy")
    return evaluated[-1]


def stage_metrics(job: Job, stage: str | None) -> dict:
    """The metrics of the named stage (default: the last stage that reports ``accuracy``)."""
    return stage_entry(job, stage)["metrics"]


def as_json(result) -> dict:
    """A dataclass result as ``summary.json`` holds it (tuples become lists)."""
    return json.loads(json.dumps(asdict(result)))


def _stat(values: list[float]) -> dict:
    return as_json(mean_ci(values))


def _maybe_stat(values: list) -> dict | None:
    """The statistics of a metric every job reports; None when some job's stage does not report it."""
    return None if any(v is None for v in values) or not values else _stat([float(v) for v in values])


def _mean(stat: dict | None, digits: int) -> str:
    return "-" if stat is None else f"{stat['mean']:.{digits}f}"


def summarize(groups: dict[str, list[Job]], stage: str | None = None) -> dict:
    """Mean, sample standard deviation and 95% Student-t interval of accuracy (overall and per level),
    response length and train time per group."""
    rows = []
    for label, jobs in groups.items():
        metrics = [stage_metrics(job, stage) for job in jobs]
        levels = sorted({lvl for m in metrics for lvl in (m.get("accuracy_by_level") or {})}, key=int)
        rows.append(
            {
                "group": label,
                "overrides": dict(item.split("=", 1) for item in label.split(" ") if "=" in item),
                "jobs": [job.dir.name for job in jobs],
                "accuracy": _stat([float(m["accuracy"]) for m in metrics]),
                "accuracy_by_level": {
                    lvl: _stat([float(m["accuracy_by_level"][lvl]) for m in metrics if lvl in m["accuracy_by_level"]])
                    for lvl in levels
                },
                # an evaluation stage trains nothing: no train time (None, shown "-"), never a 0
                "mean_response_tokens": _maybe_stat([m.get("mean_response_tokens") for m in metrics]),
                "train_seconds": _maybe_stat([m.get("train_seconds") for m in metrics]),
                "warning": seed_warning(len(metrics)),
            }
        )
    return {"stage": stage, "groups": rows}


def _pm(stat: dict) -> str:
    spread = f" ± {100 * stat['std']:.1f}" if stat["std"] is not None else ""
    return f"{100 * stat['mean']:.1f}{spread}"


def _ci(stat: dict) -> str:
    return "n/a" if stat["low"] is None else f"[{100 * stat['low']:.1f}, {100 * stat['high']:.1f}]"


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    levels = sorted({lvl for g in summary["groups"] for lvl in g["accuracy_by_level"]}, key=int)
    header = ["group", "runs", "acc %", "95% CI", *[f"L{lvl} %" for lvl in levels], "resp tok", "train s", "note"]
    rows = [
        [
            g["group"],
            str(g["accuracy"]["n"]),
            _pm(g["accuracy"]),
            _ci(g["accuracy"]),
            *[_pm(g["accuracy_by_level"][lvl]) if lvl in g["accuracy_by_level"] else "-" for lvl in levels],
            _mean(g["mean_response_tokens"], 1),
            _mean(g["train_seconds"], 0),
            g["warning"],
        ]
        for g in summary["groups"]
    ]
    return header, rows


def job_cell(label: str, jobs: list[Job], stage: str | None, over: tuple[str, ...]) -> Cell:
    """The jobs' accuracy on ``stage`` per seed key (``seed=3``: the ``over`` overrides) and their per-problem
    scores from the stage's ``generations.jsonl``."""
    cell = Cell(label)
    for job in jobs:
        key = " ".join(f"{k}={job.overrides.get(k, '-')}" for k in over)
        if key in cell.accuracy:
            raise KeyError(f"{label}: two jobs with {key} (pairing needs one job per seed; see --over)")
        entry = stage_entry(job, stage)
        cell.accuracy[key] = float(entry["metrics"]["accuracy"])
        scores = problem_scores(job.dir / entry["dir"] / "generations.jsonl") if entry.get("dir") else None
        if scores is not None:
            cell.problems[key] = scores
    return cell


def comparisons(
    groups: dict[str, list[Job]],
    stage: str | None,
    over: tuple[str, ...],
    baseline: str | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    compare_stages: Sequence[tuple[str, str]] = (),
    n_boot: int = 10_000,
    boot_seed: int = 0,
) -> list[Comparison]:
    """Every cell against ``baseline``, each ``(a, b)`` of ``pairs`` (cells named as :func:`resolve_cell`
    takes them), and in every cell each ``(stage_a, stage_b)`` of ``compare_stages``: ``a - b`` per seed."""
    labels = list(groups)
    out = []

    def cells(a: str, b: str, stage_a: str | None, stage_b: str | None, name: str | None = None) -> None:
        cell_a, cell_b = job_cell(a, groups[a], stage_a, over), job_cell(b, groups[b], stage_b, over)
        out.append(compare(cell_a, cell_b, name, n_boot=n_boot, seed=boot_seed))

    if baseline is not None:
        base = resolve_cell(baseline, labels, "--baseline")
        for label in labels:
            if label != base:
                cells(label, base, stage, stage)
    for a, b in pairs:
        cells(resolve_cell(a, labels, "--pair"), resolve_cell(b, labels, "--pair"), stage, stage)
    for stage_a, stage_b in compare_stages:
        for label in labels:
            prefix = "" if label == "all" else f"{label}: "
            cells(label, label, stage_a, stage_b, f"{prefix}{stage_a} - {stage_b}")
    return out


def load_sweeps(sweep_dirs: list[Path]) -> tuple[list[Job], list[Path]]:
    """Finished jobs pooled over several multirun folders; a later folder's job with the same overrides as an
    earlier one (a rerun) replaces it, and an unfinished job that a later folder finished is not reported."""
    by_overrides: dict[tuple, Job] = {}
    unfinished: list[Path] = []
    for sweep_dir in sweep_dirs:
        jobs, left = load_jobs(sweep_dir)
        for job in jobs:
            by_overrides[tuple(sorted(job.overrides.items()))] = job
        unfinished.extend(left)
    done = set(by_overrides)
    unfinished = [d for d in unfinished if tuple(sorted(read_overrides(d).items())) not in done]
    return list(by_overrides.values()), unfinished


@dataclass(frozen=True)
class Aggregated:
    """What :func:`aggregate_sweeps` wrote: the summary (``summary.json``) and the paired comparisons."""

    summary: dict
    comparisons: list[Comparison]


def aggregate(*args, **kwargs) -> dict:
    """:func:`aggregate_sweeps`' summary (the contents of ``summary.json``)."""
    return aggregate_sweeps(*args, **kwargs).summary


def aggregate_sweeps(
    sweep_dir: Path | list[Path],
    over: tuple[str, ...] = ("seed",),
    stage: str | None = None,
    x_key: str | None = None,
    out_dir: Path | None = None,
    *,
    baseline: str | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    compare_stages: Sequence[tuple[str, str]] = (),
    n_boot: int = 10_000,
    boot_seed: int = 0,
) -> Aggregated:
    """Summarise the multirun in ``sweep_dir`` (or several pooled); writes ``summary.{json,md,png}`` and
    ``summary_ci.png`` into ``out_dir`` (default: the first sweep folder) and returns them.

    With ``x_key`` (a numeric override such as ``data_fraction``) the plot is accuracy against it, one line
    per value of the other varying overrides; otherwise grouped bars per level. ``baseline``, ``pairs`` and
    ``compare_stages`` add paired comparisons (:func:`comparisons`) to the summary and ``comparisons.png``."""
    sweep_dirs = [sweep_dir] if isinstance(sweep_dir, Path) else list(sweep_dir)
    out_dir = out_dir or sweep_dirs[0]
    jobs, unfinished = load_sweeps(sweep_dirs)
    if not jobs:
        names = ", ".join(str(d) for d in sweep_dirs)
        raise FileNotFoundError(f"{names}: no job folder has a results.json (is the sweep still running?)")
    groups = group_jobs(jobs, over)
    summary = summarize(groups, stage)
    compared = comparisons(groups, stage, over, baseline, pairs, compare_stages, n_boot, boot_seed)
    summary.update(
        sweep_dir=str(sweep_dirs[0]) if len(sweep_dirs) == 1 else [str(d) for d in sweep_dirs],
        over=list(over),
        unfinished=[str(p.relative_to(p.parent.parent)) if len(sweep_dirs) > 1 else p.name for p in unfinished],
        comparisons=[as_json(c) for c in compared],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "summary.json", summary)
    tables = markdown_table(*table_rows(summary))
    if compared:
        tables += "\n" + markdown_table(*comparison_rows(compared))
    atomic_write_text(out_dir / "summary.md", tables)
    more = f" (+{len(sweep_dirs) - 1} more)" if len(sweep_dirs) > 1 else ""
    title = f"{sweep_dirs[0].name}{more}: {stage or 'last evaluated stage'}, over {', '.join(over)}"
    if x_key is not None:
        plot_lines(summary, x_key, out_dir / "summary.png", title)
    else:
        plot_summary(summary, out_dir / "summary.png", title)
    plot_cell_cis(summary, out_dir / "summary_ci.png", title)
    if compared:
        plot_differences(compared, out_dir / "comparisons.png", title)
    return Aggregated(summary, compared)


def _stage_pair(text: str) -> tuple[str, str]:
    stage_a, sep, stage_b = text.partition(",")
    if not sep or not stage_a or not stage_b or "," in stage_b:
        raise argparse.ArgumentTypeError(f"expected two stage names as A,B (got {text!r})")
    return stage_a, stage_b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdpipe-aggregate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "sweep_dirs", type=Path, nargs="+", help="Hydra multirun folder(s) (logs/multiruns/<date_time>), pooled"
    )
    parser.add_argument("--over", nargs="+", default=["seed"], help="override keys that are repeats (default: seed)")
    parser.add_argument("--stage", default=None, help="stage to summarise (default: the last evaluated one)")
    parser.add_argument("--x", default=None, help="plot accuracy against this numeric override (e.g. data_fraction)")
    parser.add_argument("--out", type=Path, default=None, help="folder for summary.* (default: the first sweep)")
    parser.add_argument("--baseline", default=None, help="compare every other cell with this one (label or value)")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="compare cell A with cell B, A - B (repeatable)")  # fmt: skip
    parser.add_argument("--compare-stages", type=_stage_pair, action="append", default=[], metavar="A,B",
                        help="in every cell, stage A - stage B of the same jobs (repeatable)")  # fmt: skip
    parser.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples of the test problems")
    parser.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap (deterministic)")
    args = parser.parse_args(argv)
    out_dir = args.out or args.sweep_dirs[0]
    try:
        result = aggregate_sweeps(
            args.sweep_dirs, tuple(args.over), args.stage, args.x, out_dir, baseline=args.baseline,
            pairs=[tuple(p) for p in args.pair], compare_stages=args.compare_stages, n_boot=args.n_boot,
            boot_seed=args.boot_seed,
        )  # fmt: skip
    except Exception as err:  # a folder without results (file), a --stage or --x that names nothing (argument)
        if not report_user_error("kdpipe-aggregate", err, ((KeyError, "argument"),)):
            raise
        return 2
    summary = result.summary
    header, rows = table_rows(summary)
    names = " + ".join(str(d) for d in args.sweep_dirs)
    over = ", ".join(args.over)
    console.print(rich_table(header, rows, title=f"{names} (mean ± std and 95% t CI over {over})"))
    plots = [out_dir / "summary.png", out_dir / "summary_ci.png"]
    if result.comparisons:
        title = "paired differences a - b, accuracy points (verdict: both CIs above 0 / below 0)"
        console.print(rich_table(*comparison_rows(result.comparisons), title=title))
        plots.append(out_dir / "comparisons.png")
    if any(g["warning"] for g in summary["groups"]):
        console.print(f"[yellow]fewer than {MIN_SEEDS} seeds in a cell (see note): too few for a claim")
    if summary["unfinished"]:
        console.print(f"[yellow]left out, not finished: {', '.join(summary['unfinished'])}")
    console.print(f"summary: {out_dir / 'summary.md'}  plots: {'  '.join(str(p) for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
