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
level) and ``summary.png`` (the same as bars with error bars) into the sweep folder, and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console

from kdpipe.cli.errors import report_user_error
from kdpipe.utils.io import atomic_write_json, atomic_write_text, read_json
from kdpipe.utils.plots import save_accuracy_plot
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
    """Finished jobs under ``sweep_dir`` (folders with a ``results.json``), and the folders without one."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory (expected a Hydra multirun folder)")
    jobs, unfinished = [], []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_job_key):
        results = job_dir / "results.json"
        if results.exists():
            jobs.append(Job(job_dir, read_overrides(job_dir), read_json(results)))
        elif (job_dir / ".hydra").exists() or (job_dir / "config.yaml").exists():
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


def stage_metrics(job: Job, stage: str | None) -> dict:
    """The metrics of the named stage (default: the last stage that reports ``accuracy``)."""
    stages = job.results.get("stages") or []
    if stage is not None:
        named = [s for s in stages if s["name"] == stage]
        if not named:
            raise KeyError(f"{job.dir / 'results.json'}: no stage {stage!r} (has {[s['name'] for s in stages]})")
        if named[-1]["metrics"].get("accuracy") is None:
            metric = named[-1]["metrics"].get("metric")
            raise KeyError(f"{job.dir / 'results.json'}: stage {stage!r} reports no accuracy (its metric: {metric})")
        return named[-1]["metrics"]
    evaluated = [s for s in stages if s["metrics"].get("accuracy") is not None]
    if not evaluated:
        raise KeyError(f"{job.dir / 'results.json'}: no stage reports accuracy")
    return evaluated[-1]["metrics"]


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def summarize(groups: dict[str, list[Job]], stage: str | None = None) -> dict:
    """Mean and sample standard deviation of accuracy (overall and per level), response length and train
    time per group."""
    rows = []
    for label, jobs in groups.items():
        metrics = [stage_metrics(job, stage) for job in jobs]
        levels = sorted({lvl for m in metrics for lvl in (m.get("accuracy_by_level") or {})}, key=int)
        rows.append(
            {
                "group": label,
                "overrides": dict(item.split("=", 1) for item in label.split(" ") if "=" in item),
                "jobs": [job.dir.name for job in jobs],
                "accuracy": _mean_std([float(m["accuracy"]) for m in metrics]),
                "accuracy_by_level": {
                    lvl: _mean_std(
                        [float(m["accuracy_by_level"][lvl]) for m in metrics if lvl in m["accuracy_by_level"]]
                    )
                    for lvl in levels
                },
                "mean_response_tokens": _mean_std([float(m.get("mean_response_tokens", 0.0)) for m in metrics]),
                "train_seconds": _mean_std([float(m.get("train_seconds", 0.0)) for m in metrics]),
            }
        )
    return {"stage": stage, "groups": rows}


def _pm(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    levels = sorted({lvl for g in summary["groups"] for lvl in g["accuracy_by_level"]}, key=int)
    header = ["group", "runs", "acc %", *[f"L{lvl} %" for lvl in levels], "resp tok", "train s"]
    rows = [
        [
            g["group"],
            str(g["accuracy"]["n"]),
            _pm(g["accuracy"]),
            *[_pm(g["accuracy_by_level"][lvl]) if lvl in g["accuracy_by_level"] else "-" for lvl in levels],
            f"{g['mean_response_tokens']['mean']:.1f}",
            f"{g['train_seconds']['mean']:.0f}",
        ]
        for g in summary["groups"]
    ]
    return header, rows


def plot_summary(summary: dict, path: Path, title: str) -> None:
    """Grouped bars with standard-deviation error bars: accuracy per level and overall, per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    levels = sorted({lvl for g in groups for lvl in g["accuracy_by_level"]}, key=int)
    ticks = [f"L{lvl}" for lvl in levels] + ["all"]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.3 * len(ticks) * len(groups) + len(ticks)), 4.2))
    width = 0.8 / max(len(groups), 1)
    for i, g in enumerate(groups):
        stats = [g["accuracy_by_level"].get(lvl, {"mean": 0.0, "std": 0.0}) for lvl in levels] + [g["accuracy"]]
        xs = [t + (i - (len(groups) - 1) / 2) * width for t in range(len(ticks))]
        ax.bar(
            xs,
            [100 * s["mean"] for s in stats],
            width=width,
            yerr=[100 * s["std"] for s in stats],
            capsize=2,
            label=f"{g['group']} (n={g['accuracy']['n']})",
        )
    ax.set_xticks(range(len(ticks)), ticks)
    save_accuracy_plot(fig, ax, path, "exact match (%), mean ± std", title)


def plot_lines(summary: dict, x_key: str, path: Path, title: str) -> None:
    """Accuracy (mean ± std) against a numeric override ``x_key``, one line per value of the other keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, dict]]] = {}
    for g in summary["groups"]:
        if x_key not in g["overrides"]:
            raise KeyError(f"--x {x_key}: group {g['group']!r} does not vary it (keys: {sorted(g['overrides'])})")
        rest = " ".join(f"{k}={v}" for k, v in g["overrides"].items() if k != x_key) or "all"
        series.setdefault(rest, []).append((float(g["overrides"][x_key]), g["accuracy"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in series.items():
        points.sort(key=lambda p: p[0])
        xs = [p[0] for p in points]
        ax.errorbar(xs, [100 * p[1]["mean"] for p in points], yerr=[100 * p[1]["std"] for p in points],
                    marker="o", capsize=3, label=name)  # fmt: skip
    if all(p[0] > 0 for pts in series.values() for p in pts):
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    save_accuracy_plot(fig, ax, path, "exact match (%), mean ± std", title)


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


def aggregate(
    sweep_dir: Path | list[Path],
    over: tuple[str, ...] = ("seed",),
    stage: str | None = None,
    x_key: str | None = None,
    out_dir: Path | None = None,
) -> dict:
    """Summarise the multirun in ``sweep_dir`` (or several pooled); writes ``summary.{json,md,png}`` into
    ``out_dir`` (default: the first sweep folder) and returns it.

    With ``x_key`` (a numeric override such as ``data_fraction``) the plot is accuracy against it, one line
    per value of the other varying overrides; otherwise grouped bars per level."""
    sweep_dirs = [sweep_dir] if isinstance(sweep_dir, Path) else list(sweep_dir)
    out_dir = out_dir or sweep_dirs[0]
    jobs, unfinished = load_sweeps(sweep_dirs)
    if not jobs:
        names = ", ".join(str(d) for d in sweep_dirs)
        raise FileNotFoundError(f"{names}: no job folder has a results.json (is the sweep still running?)")
    summary = summarize(group_jobs(jobs, over), stage)
    summary.update(
        sweep_dir=str(sweep_dirs[0]) if len(sweep_dirs) == 1 else [str(d) for d in sweep_dirs],
        over=list(over),
        unfinished=[str(p.relative_to(p.parent.parent)) if len(sweep_dirs) > 1 else p.name for p in unfinished],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", markdown_table(*table_rows(summary)))
    more = f" (+{len(sweep_dirs) - 1} more)" if len(sweep_dirs) > 1 else ""
    title = f"{sweep_dirs[0].name}{more}: {stage or 'last evaluated stage'}, over {', '.join(over)}"
    if x_key is not None:
        plot_lines(summary, x_key, out_dir / "summary.png", title)
    else:
        plot_summary(summary, out_dir / "summary.png", title)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdpipe-aggregate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "sweep_dirs", type=Path, nargs="+", help="Hydra multirun folder(s) (logs/multiruns/<date_time>), pooled"
    )
    parser.add_argument("--over", nargs="+", default=["seed"], help="override keys that are repeats (default: seed)")
    parser.add_argument("--stage", default=None, help="stage to summarise (default: the last evaluated one)")
    parser.add_argument("--x", default=None, help="plot accuracy against this numeric override (e.g. data_fraction)")
    parser.add_argument("--out", type=Path, default=None, help="folder for summary.* (default: the first sweep)")
    args = parser.parse_args(argv)
    out_dir = args.out or args.sweep_dirs[0]
    try:
        summary = aggregate(args.sweep_dirs, tuple(args.over), args.stage, args.x, out_dir)
    except Exception as err:  # a folder without results (file), a --stage or --x that names nothing (argument)
        if not report_user_error("kdpipe-aggregate", err, ((KeyError, "argument"),)):
            raise
        return 2
    header, rows = table_rows(summary)
    names = " + ".join(str(d) for d in args.sweep_dirs)
    console.print(rich_table(header, rows, title=f"{names} (mean ± std over {', '.join(args.over)})"))
    if summary["unfinished"]:
        console.print(f"[yellow]left out, no results.json: {', '.join(summary['unfinished'])}")
    console.print(f"summary: {out_dir / 'summary.md'}  plot: {out_dir / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
