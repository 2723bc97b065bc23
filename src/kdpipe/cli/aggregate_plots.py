"""The plots of ``kdpipe-aggregate``: accuracy per level (bars, ± std), against a numeric override (lines),
per cell with its 95% interval, and the paired differences with theirs around a zero line."""

from __future__ import annotations

from pathlib import Path

from kdpipe.cli.aggregate_compare import Comparison
from kdpipe.utils.plots import finish_plot, save_accuracy_plot


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
            yerr=[100 * (s["std"] or 0.0) for s in stats],
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
        ax.errorbar(xs, [100 * p[1]["mean"] for p in points], yerr=[100 * (p[1]["std"] or 0.0) for p in points],
                    marker="o", capsize=3, label=name)  # fmt: skip
    if all(p[0] > 0 for pts in series.values() for p in pts):
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    save_accuracy_plot(fig, ax, path, "exact match (%), mean ± std", title)


def plot_cell_cis(summary: dict, path: Path, title: str) -> None:
    """Overall accuracy per cell: the mean and its 95% Student-t interval over the repeats (a point without
    bars: fewer than 2 repeats, no interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    fig, ax = plt.subplots(figsize=(min(14, 4 + 0.6 * len(groups)), 4.2))
    for i, g in enumerate(groups):
        acc = g["accuracy"]
        low, high = (acc["low"], acc["high"]) if acc["low"] is not None else (acc["mean"], acc["mean"])
        err = [[100 * (acc["mean"] - low)], [100 * (high - acc["mean"])]]
        count = g["warning"] or f"n={acc['n']}"  # "n=3 < 5" under the protocol's seeds
        ax.errorbar([i], [100 * acc["mean"]], yerr=err, fmt="o", capsize=4, label=f"{g['group']} ({count})")
    ax.set_xticks(range(len(groups)), [str(i + 1) for i in range(len(groups))])
    save_accuracy_plot(fig, ax, path, "exact match (%), mean and 95% CI", title)


def plot_differences(comparisons: list[Comparison], path: Path, title: str) -> None:
    """Each comparison's mean difference ``a - b`` in points, with its t interval over seeds and its bootstrap
    interval over problems, around a zero line (an interval clear of it: a difference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 1.6 + 0.55 * len(comparisons)))
    ys = list(range(len(comparisons)))[::-1]
    for kind, offset, marker, pick in (
        ("t CI over seeds", 0.12, "o", lambda c: c.paired.ci),
        ("bootstrap CI over problems", -0.12, "s", lambda c: c.bootstrap),
    ):
        pts = [(y + offset, pick(c)) for y, c in zip(ys, comparisons) if getattr(pick(c), "mean", None) is not None]
        lows = [max(0.0, 100 * (ci.mean - ci.low)) if ci.low is not None else 0.0 for _, ci in pts]
        highs = [max(0.0, 100 * (ci.high - ci.mean)) if ci.high is not None else 0.0 for _, ci in pts]
        ax.errorbar([100 * ci.mean for _, ci in pts], [y for y, _ in pts], xerr=[lows, highs], fmt=marker,
                    capsize=4, label=kind)  # fmt: skip
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_yticks(ys, [f"{c.name} (n={c.paired.ci.n}): {c.verdict}" for c in comparisons])
    ax.set_xlabel("accuracy difference a - b (points), 95% CI")
    finish_plot(fig, ax, path, title, grid_axis="x")
