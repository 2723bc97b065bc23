"""The run's summary: a mode column, and each KD stage against the stage before it in its mode and its control."""

from __future__ import annotations

from kdpipe.pipeline.report import comparison_lines, comparisons, table_rows


def stage(name, kind, acc, style, model="student"):
    metrics = {} if acc is None else {"accuracy": acc, "eval_style": style}
    return {"name": name, "kind": kind, "model": model, "dir": f"00_{name}", "status": "done", "metrics": metrics}


STAGES = [
    stage("teacher_fast_eval", "eval", 0.95, "fast", model="teacher"),
    stage("score", "score", None, None, model="teacher"),
    stage("sft_reasoning", "sft", 0.60, "reasoning"),
    stage("kd_reasoning", "kd", 0.70, "reasoning"),
    stage("sft_fast", "sft", 0.50, "fast"),
    stage("kd_fast", "kd", 0.80, "fast"),
    stage("kd_fast_control", "sft", 0.55, "fast"),
]


def test_each_kd_stage_is_compared_with_the_last_stage_in_its_mode_and_its_control():
    found = comparisons(STAGES, {"kd_fast_control": "kd_fast"})
    assert [c["stage"] for c in found] == ["kd_reasoning", "kd_fast"]
    kd_r, kd_f = found
    assert kd_r["before"] == {"stage": "sft_reasoning", "accuracy": 0.60} and kd_r["control"] is None
    # the teacher's fast evaluation is another model's: not what the student's kd_fast started from
    assert kd_f["before"] == {"stage": "sft_fast", "accuracy": 0.50}
    assert kd_f["control"] == {"stage": "kd_fast_control", "accuracy": 0.55}
    lines = comparison_lines({"comparisons": found})
    assert lines[1] == (
        "kd_fast (fast) 80.0%: +30.0 points over sft_fast (50.0%), "
        "+25.0 points over its control kd_fast_control (55.0%)"
    )
    assert "one seed" in lines[-1]


def test_a_control_is_never_the_stage_before_and_the_table_shows_the_mode():
    later_kd = [*STAGES, stage("kd_fast2", "kd", 0.85, "fast")]
    found = comparisons(later_kd, {"kd_fast_control": "kd_fast"})
    assert found[-1]["before"]["stage"] == "kd_fast"
    header, rows = table_rows({"stages": STAGES})
    assert "mode" in header and rows[0][header.index("mode")] == "fast"
