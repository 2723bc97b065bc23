"""Summaries of a run: ``results.json``, ``results.md`` (the table) and ``results.png`` (accuracy per level)."""

from __future__ import annotations

from pathlib import Path

from kdpipe.pipeline.state import PipelineState
from kdpipe.utils.dist import is_rank_zero
from kdpipe.utils.io import atomic_write_json, atomic_write_text
from kdpipe.utils.plots import save_accuracy_plot
from kdpipe.utils.tables import markdown_table


def results_payload(state: PipelineState) -> dict:
    """``{"stages": [{"name", "kind", "model", "dir", "status", "metrics"}]}`` for every stage so far."""
    return {
        "stages": [
            {"name": s.name, "kind": s.kind, "model": s.model, "dir": s.dir, "status": s.status, "metrics": s.metrics}
            for s in state.stages
        ]
    }


def _levels(stages: list[dict]) -> list[str]:
    levels = {lvl for s in stages for lvl in (s["metrics"].get("accuracy_by_level") or {})}
    return sorted(levels, key=int)


def _fmt(value, pct: bool = False, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


BUILT_IN_METRIC = "answer_match(answer_colon)"


def _evaluated(payload: dict) -> list[dict]:
    return [s for s in payload["stages"] if "accuracy" in s["metrics"] or "metric" in s["metrics"]]


def _accuracy(m: dict) -> str:
    """The accuracy cell: a percentage, or why there is none (``n/a: loss only``, ``n/a: no reference``)."""
    if m.get("accuracy") is not None:
        return _fmt(m["accuracy"], pct=True)
    return {"loss": "n/a: loss only", "lm_eval": "n/a: lm_eval"}.get(m.get("metric"), "n/a: no reference")


def table_rows(payload: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: one row per stage that was evaluated (a ``metric`` column when a
    stage was scored otherwise than the built-in task's ``Answer: N``)."""
    stages = _evaluated(payload)
    levels = _levels(stages)
    show_metric = any(s["metrics"].get("metric", BUILT_IN_METRIC) != BUILT_IN_METRIC for s in stages)
    header = ["#", "stage", "kind", "model", *(["metric"] if show_metric else []), "acc %"]
    header += [*[f"L{lvl} %" for lvl in levels], "resp tok", "loss", "train s"]
    rows = []
    for s in stages:
        m = s["metrics"]
        by_level = m.get("accuracy_by_level") or {}
        tokens = m.get("mean_response_tokens")
        rows.append(
            [
                s["dir"].split("_", 1)[0],
                s["name"],
                s["kind"],
                s["model"],
                *([str(m.get("metric", BUILT_IN_METRIC))] if show_metric else []),
                _accuracy(m),
                *[_fmt(by_level.get(lvl), pct=True) for lvl in levels],
                "-" if tokens is None else f"{tokens:.1f}",
                _fmt(m.get("loss")),
                f"{m['train_seconds']:.0f}" if "train_seconds" in m else "-",
            ]
        )
    return header, rows


def plot_accuracy(payload: dict, path: Path) -> bool:
    """Grouped bars: accuracy per level (and overall) for each evaluated stage. False if nothing to plot."""
    stages = [s for s in payload["stages"] if s["metrics"].get("accuracy") is not None]
    if not stages:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = _levels(stages)
    groups = [f"L{lvl}" for lvl in levels] + ["all"]
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * len(groups) * len(stages) + len(groups)), 4.2))
    width = 0.8 / len(stages)
    for i, s in enumerate(stages):
        by_level = s["metrics"].get("accuracy_by_level") or {}
        values = [100 * by_level.get(lvl, 0.0) for lvl in levels] + [100 * s["metrics"]["accuracy"]]
        xs = [g + (i - (len(stages) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width=width, label=f"{s['dir']} ({s['model']})")
    ax.set_xticks(range(len(groups)), groups)
    save_accuracy_plot(fig, ax, path, "exact match (%)", "Accuracy per stage and difficulty level")
    return True


def write_results(state: PipelineState) -> dict:
    """Write ``results.json``, ``results.md`` and ``results.png`` into the run dir (global rank 0 only);
    returns the payload."""
    payload = results_payload(state)
    if not is_rank_zero():
        return payload
    atomic_write_json(state.run_dir / "results.json", payload)
    atomic_write_text(state.run_dir / "results.md", markdown_table(*table_rows(payload)))
    plot_accuracy(payload, state.run_dir / "results.png")
    return payload
