"""``pipeline_state.json``: the version-2 format round trip, what later stages start from, and the migration of
a version-1 state (kdpipe 0.1) on load; an unknown version is refused, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.result import StageResult, StoreRef
from kdpipe.pipeline.spec import StageSpec
from kdpipe.pipeline.state import STATE_FILE, PipelineState

# a run of kdpipe 0.1: a shared teacher, its label store, SFT, a rollout set, its store, on-policy KD (all on
# rollouts: onpolicy_lambda 1, so no label store read), and a KD stage that was running when the run stopped
STAGES = [
    ("teacher_sft", "sft", "teacher"),
    ("score", "score", "teacher"),
    ("sft_fast", "sft", "student"),
    ("rollout_fast", "rollout", "student"),
    ("score_rollouts_fast", "score", "teacher"),
    ("kd_fast_onpolicy", "kd", "student"),
    ("kd_fast", "kd", "student"),
]


def specs() -> list[StageSpec]:
    return [StageSpec(i, name, OmegaConf.create({"kind": kind, "model": model})) for i, (name, kind, model) in
            enumerate(STAGES)]  # fmt: skip


def v1_state(run: Path, shared: Path, stores: Path) -> dict:
    """``pipeline_state.json`` exactly as kdpipe 0.1 wrote it (dataclasses.asdict of its PipelineState)."""
    fast, fast_rollouts = stores / "fast-train-k8-0123456789ab", stores / "fast-rollouts-k8-ba9876543210"
    rollouts = run / "04_rollout_fast" / "rollouts"

    def stage(index, metrics, export=None, status="done"):
        name, kind, model = STAGES[index]
        return {"name": name, "kind": kind, "model": model, "dir": f"{index + 1:02d}_{name}", "status": status,
                "metrics": metrics, "export": export, "started_at": 10.0 + index,
                "finished_at": None if status != "done" else 11.0 + index}  # fmt: skip

    store_stats = {"reused": False, "examples": 25, "label_tokens": 100, "bytes": 300, "bytes_per_entry": 0.375}
    return {
        "version": 1,
        "stages": [
            stage(0, {"accuracy": 0.5, "shared_to": str(shared)}, export=str(shared / "export")),
            stage(1, {"stores": {"fast": str(fast)}, "fast_store": {"path": str(fast), **store_stats}}),
            stage(2, {"accuracy": 0.25, "train_loss": 1.5}, export="03_sft_fast/export"),
            stage(3, {"samples": 48, "rollouts": {"fast": str(rollouts)}}),
            stage(
                4,
                {
                    "stores": {"fast:rollouts": str(fast_rollouts)},
                    "fast_rollout_store": {"path": str(fast_rollouts), **store_stats},
                },
            ),
            stage(
                5,
                {"accuracy": 0.3, "store": None, "onpolicy_store": str(fast_rollouts), "onpolicy_examples": 48},
                export="06_kd_fast_onpolicy/export",
            ),
            stage(6, {}, status="running"),
        ],
        "model_paths": {"teacher": str(shared / "export"), "student": "06_kd_fast_onpolicy/export"},
        "stores": {"fast": str(fast), "fast:rollouts": str(fast_rollouts)},
        "rollouts": {"fast": str(rollouts)},
    }


def test_a_version_1_state_is_migrated_on_load(tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    shared, stores = logs / "shared" / "teacher_sft-abc", logs / "stores"
    run.mkdir()
    old = v1_state(run, shared, stores)
    (run / STATE_FILE).write_text(json.dumps(old))
    state = PipelineState.load(run, specs())
    # what the next stages start from and read: what kdpipe 0.1's model_paths, stores and rollouts said
    assert state.model_path("teacher") == shared / "export"
    assert state.model_path("student") == run / old["model_paths"]["student"]
    # a store of rollouts is keyed by the rollout stage whose set it scored: for 0.1, the latest of its style
    assert state.stores == {
        ("fast", "labels", None): stores / "fast-train-k8-0123456789ab",
        ("fast", "rollouts", "rollout_fast"): stores / "fast-rollouts-k8-ba9876543210",
    }
    assert state.rollouts == {"rollout_fast": run / "04_rollout_fast" / "rollouts"}
    # every stage's record: the same progress; artifacts out of the metrics, into the typed result
    assert [(s.name, s.kind, s.model, s.dir, s.status) for s in state.stages] == [
        (s["name"], s["kind"], s["model"], s["dir"], s["status"]) for s in old["stages"]
    ]
    assert [(s.started_at, s.finished_at) for s in state.stages] == [
        (s["started_at"], s["finished_at"]) for s in old["stages"]
    ]
    score, rollout, onpolicy = (state.stages[i].result for i in (1, 3, 5))
    running = state.stages[6]
    assert score.stores == [StoreRef("fast", "labels", stores / "fast-train-k8-0123456789ab")]
    assert "stores" not in score.metrics and score.metrics["fast_store"]["name"] == "fast-train-k8-0123456789ab"
    assert "path" not in score.metrics["fast_store"] and score.metrics["fast_store"]["label_tokens"] == 100
    assert state.stages[4].result.stores == [
        StoreRef("fast", "rollouts", stores / "fast-rollouts-k8-ba9876543210", "rollout_fast")
    ]
    assert rollout.rollouts == {"fast": run / "04_rollout_fast" / "rollouts"} and "rollouts" not in rollout.metrics
    assert onpolicy.reads == {"onpolicy_store": str(stores / "fast-rollouts-k8-ba9876543210")}
    assert onpolicy.metrics == {"accuracy": 0.3, "onpolicy_examples": 48}  # no store read: no key left behind
    assert onpolicy.export == run / "06_kd_fast_onpolicy" / "export"
    assert state.stages[0].result.metrics == {"accuracy": 0.5, "shared_to": str(shared)}
    assert running.result is None and running.metrics == {}
    # saved again in version 2: the artifacts once, in the stages' results; nothing derived is stored
    state.save()
    saved = json.loads((run / STATE_FILE).read_text())
    assert saved["version"] == 2 and set(saved) == {"version", "stages"}
    assert saved["stages"][2]["result"]["export"] == "03_sft_fast/export"  # inside the run: relative
    assert saved["stages"][0]["result"]["export"] == str(shared / "export")  # outside it: absolute
    again = PipelineState.load(run, specs())
    assert again.stores == state.stores and again.rollouts == state.rollouts
    assert [s.result for s in again.stages] == [s.result for s in state.stages]


def test_a_version_2_state_round_trips_and_later_stages_start_from_the_latest_artifacts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = PipelineState.new(run, specs())
    assert state.model_path("student") is None and state.stores == {} and state.rollouts == {}
    first, second = tmp_path / "stores" / "fast-a", tmp_path / "stores" / "fast-b"
    state.mark_done(0, StageResult({"accuracy": 0.5}, export=run / "01_teacher_sft" / "export"))
    state.mark_done(1, StageResult({}, stores=[StoreRef("fast", "labels", first)]))
    state.mark_done(2, StageResult({}, export=run / "03_sft_fast" / "export"))
    state.mark_done(4, StageResult({}, stores=[StoreRef("fast", "labels", second)]))  # a later store of fast
    state.mark_running(5)
    raw = json.loads((run / STATE_FILE).read_text())
    assert raw["version"] == 2 and [s["status"] for s in raw["stages"]] == ["done"] * 3 + ["pending", "done",
                                                                              "running", "pending"]  # fmt: skip
    assert raw["stages"][1]["result"]["stores"] == [{"style": "fast", "sequences": "labels", "path": str(first)}]
    loaded = PipelineState.load(run, specs())
    assert loaded.model_path("teacher") == run / "01_teacher_sft" / "export"
    assert loaded.model_path("student") == run / "03_sft_fast" / "export"
    assert loaded.stores == {("fast", "labels", None): second}


def test_stores_of_rollouts_are_keyed_by_the_rollout_stage_and_older_ones_get_the_latest_of_their_style(tmp_path):
    """Two rollout sets of one style (a teacher's and a student's) and a store of each do not collide; a store
    of rollouts saved without its source (before stores named it) is given the latest rollout stage of its
    style before it, as that kdpipe looked it up."""
    names = [("rollout_teacher", "rollout", "teacher"), ("rollout_student", "rollout", "student"),
             ("score_t", "score", "teacher"), ("score_s", "score", "teacher"), ("old", "score", "teacher")]  # fmt: skip
    order = [StageSpec(i, n, OmegaConf.create({"kind": k, "model": m})) for i, (n, k, m) in enumerate(names)]
    run = tmp_path / "run"
    run.mkdir()
    state = PipelineState.new(run, order)
    sets = {
        name: run / f"0{i + 1}_{name}" / "rollouts" for i, name in enumerate(["rollout_teacher", "rollout_student"])
    }
    state.mark_done(0, StageResult({}, rollouts={"fast": sets["rollout_teacher"]}))
    state.mark_done(1, StageResult({}, rollouts={"fast": sets["rollout_student"]}))
    teacher, student, old = (tmp_path / "stores" / n for n in ("fast-rollouts-t", "fast-rollouts-s", "fast-rollouts-o"))
    state.mark_done(2, StageResult({}, stores=[StoreRef("fast", "rollouts", teacher, "rollout_teacher")]))
    state.mark_done(3, StageResult({}, stores=[StoreRef("fast", "rollouts", student, "rollout_student")]))
    state.mark_done(4, StageResult({}, stores=[StoreRef("fast", "rollouts", old)]))  # as saved before sources
    raw = json.loads((run / STATE_FILE).read_text())
    assert raw["stages"][2]["result"]["stores"][0]["source"] == "rollout_teacher"
    assert "source" not in raw["stages"][4]["result"]["stores"][0]
    loaded = PipelineState.load(run, order)
    assert loaded.rollouts == sets
    assert loaded.stores == {
        ("fast", "rollouts", "rollout_teacher"): teacher,
        ("fast", "rollouts", "rollout_student"): old,
    }
    assert loaded.stages[3].result.stores[0].key == "fast:rollouts:rollout_student"


@pytest.mark.parametrize("version", [3, 0, None])
def test_an_unknown_state_version_is_refused_naming_it(tmp_path, version):
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": version, "stages": []}))
    with pytest.raises(PipelineConfigError, match=rf"state format version {version!r}"):
        PipelineState.load(tmp_path, specs())


def test_a_state_of_another_stage_order_is_refused(tmp_path):
    PipelineState.new(tmp_path, specs()).save()
    with pytest.raises(PipelineConfigError, match="differs from the config's"):
        PipelineState.load(tmp_path, specs()[:3])
