"""Summaries of a run: ``results.json``, ``results.md`` (the table) and ``results.png`` (accuracy per level)."""

from __future__ import annotations

from pathlib import Path

from kdpipe.pipeline.state import PipelineState
from kdpipe.utils.dist import is_rank_zero
from kdpipe.utils.io import atomic_write_json, atomic_write_text
from kdpipe.utils.plots import save_accuracy_plot
from kdpipe.utils.tables import markdown_table


def results_payload(state: PipelineState, controls: dict[str, str] | None = None) -> dict:
    """``{"stages": [{"name", "kind", "model", "dir", "status", "metrics"}], "comparisons": [...]}`` for every
    stage so far; ``controls`` maps each control stage to the stage it controls (:func:`comparisons`)."""
    stages = [
        {"name": s.name, "kind": s.kind, "model": s.model, "dir": s.dir, "status": s.status, "metrics": s.metrics}
        for s in state.stages
    ]
    return {"stages": stages, "comparisons": comparisons(stages, controls or {})}


def _scored(stage: dict | None) -> dict | None:
    if stage is None or stage["metrics"].get("accuracy") is None:
        return None
    return {"stage": stage["name"], "accuracy": stage["metrics"]["accuracy"]}


def comparisons(stages: list[dict], controls: dict[str, str]) -> list[dict]:
    """Each evaluated ``kd`` stage against the stage of its model evaluated last before it in the same
    ``eval_style`` (what it started from, or the nearest stage that was evaluated so) and against its
    budget-matched control (the stage whose ``control_of`` names it), in accuracy points. One run's figures:
    a claim needs several seeds (``kdpipe-aggregate --compare-stages``)."""
    control_for = {target: name for name, target in controls.items()}
    out = []
    for i, stage in enumerate(stages):
        style = stage["metrics"].get("eval_style")
        if stage["kind"] != "kd" or _scored(stage) is None:
            continue
        earlier = [
            s for s in stages[:i]
            if s["model"] == stage["model"] and s["name"] not in controls and _scored(s) is not None
            and s["metrics"].get("eval_style") == style
        ]  # fmt: skip
        control = next((s for s in stages if s["name"] == control_for.get(stage["name"])), None)
        out.append({"stage": stage["name"], "eval_style": style, "accuracy": stage["metrics"]["accuracy"],
                    "before": _scored(earlier[-1] if earlier else None), "control": _scored(control)})  # fmt: skip
    return out


def comparison_lines(payload: dict) -> list[str]:
    """``kd_fast (fast) 80.7%: +16.1 points over sft_fast (64.6%), +14.8 over its control kd_fast_control``."""
    lines = []
    for c in payload.get("comparisons", []):
        parts = []
        for what, ref in (("over", c["before"]), ("over its control", c["control"])):
            if ref is not None:
                diff = 100 * (c["accuracy"] - ref["accuracy"])
                parts.append(f"{diff:+.1f} points {what} {ref['stage']} ({100 * ref['accuracy']:.1f}%)")
        if parts:
            lines.append(f"{c['stage']} ({c['eval_style']}) {100 * c['accuracy']:.1f}%: " + ", ".join(parts))
    if lines:
        lines.append("one run, one seed: for confidence intervals run seeds as a multirun and "
                     "kdpipe-aggregate --compare-stages (docs/results.md)")  # fmt: skip
    return lines


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
    header = ["#", "stage", "kind", "model", "mode", *(["metric"] if show_metric else []), "acc %"]
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
                str(m.get("eval_style") or "-"),
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


def write_results(state: PipelineState, controls: dict[str, str] | None = None) -> dict:
    """Write ``results.json``, ``results.md`` and ``results.png`` into the run dir (global rank 0 only);
    returns the payload."""
    payload = results_payload(state, controls)
    if not is_rank_zero():
        return payload
    atomic_write_json(state.run_dir / "results.json", payload)
    notes = "".join(f"\n- {line}" for line in comparison_lines(payload))
    atomic_write_text(state.run_dir / "results.md", markdown_table(*table_rows(payload)) + notes)
    plot_accuracy(payload, state.run_dir / "results.png")
    return payload
