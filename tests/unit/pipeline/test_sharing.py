"""Shared stages (kdpipe.pipeline.sharing, kdpipe.utils.claim): a shared folder is published once and reused only
when its identity matches; a job waits for another job training the same shared stage, then reuses its result.
(Pipelines and sweeps that share: tests/integration/test_sweeps.py, tests/integration/test_presets.py.)"""

from __future__ import annotations

import json
import threading
import time

import pytest

from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.sharing import find_shared, publish_shared, shared_dir
from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS, StageContext
from kdpipe.utils.claim import SharedLock, claim_shared


def teacher_context(tiny_cfg, tmp_path, *extra: str) -> StageContext:
    cfg = tiny_cfg("pipeline.stages.teacher_sft.share=true", *extra)
    spec = resolve_stages(cfg, set(STAGE_KINDS))[0]
    run_dir = tmp_path / "run"
    return StageContext(cfg, spec, run_dir, run_dir / spec.dirname, None)


def test_a_shared_folder_is_published_once_and_reused_only_if_its_identity_matches(tiny_cfg, tmp_path):
    ctx = teacher_context(tiny_cfg, tmp_path)
    assert find_shared(ctx) is None
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_text("first")
    root = publish_shared(ctx, StageResult({"accuracy": 0.5}, export=export))
    (export / "model.safetensors").write_text("second")  # a concurrent job finishing the same stage later
    assert publish_shared(ctx, StageResult({"accuracy": 0.5}, export=export)) == root
    assert (root / "export" / "model.safetensors").read_text() == "first"  # the first publisher wins
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temp folders left behind
    found = find_shared(ctx)
    assert found.export == root / "export" and found.metrics == {"accuracy": 0.5, "shared_from": str(root)}

    identity = json.loads((root / "identity.json").read_text())
    identity["seed"] += 1  # a folder whose name matches but whose content is another stage's
    (root / "identity.json").write_text(json.dumps(identity))
    with pytest.raises(PipelineConfigError, match="another stage's result"):
        find_shared(ctx)
    other = teacher_context(tiny_cfg, tmp_path, "pipeline.stages.teacher_sft.max_steps=9")
    assert shared_dir(other) != root and find_shared(other) is None


def test_a_job_waits_for_another_job_training_the_same_shared_stage(tiny_cfg, tmp_path):
    """Two concurrent jobs need one shared teacher: the second waits on the first's lock, then reuses what the
    first published instead of training it again; a lock whose holder is gone (released) is taken over."""
    ctx = teacher_context(tiny_cfg, tmp_path)
    root = shared_dir(ctx)
    found, first = claim_shared(root, lambda: find_shared(ctx), poll_seconds=0.02)
    assert found is None and first is not None  # nothing published, nobody training: this job trains
    result: dict = {}

    def second_job() -> None:
        result["claim"] = claim_shared(root, lambda: find_shared(ctx), poll_seconds=0.02)

    waiter = threading.Thread(target=second_job)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # blocked behind the first job's lock
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_text("trained once")
    publish_shared(ctx, StageResult({"accuracy": 0.5}, export=export))
    first.release()
    waiter.join(timeout=10)
    reused, lock = result["claim"]
    assert lock is None and reused.export == root / "export" and reused.metrics["shared_from"] == str(root)

    other = teacher_context(tiny_cfg, tmp_path, "pipeline.stages.teacher_sft.max_steps=9")
    held = SharedLock(shared_dir(other))
    assert held.try_acquire()
    held.release()  # e.g. its job died: the OS drops a dead process's flock the same way
    found, lock = claim_shared(shared_dir(other), lambda: find_shared(other), poll_seconds=0.02)
    assert found is None and lock is not None
    lock.release()


def test_a_stage_reading_no_store_is_shared_whether_or_not_a_store_was_scored_before_it(tiny_cfg, tmp_path):
    cfg = tiny_cfg("pipeline.order=[score,sft_fast,kd_fast]")
    specs = {s.name: s for s in resolve_stages(cfg, set(STAGE_KINDS))}
    stores = {("fast", "labels", None): tmp_path / "fast-train-k8-0123456789ab"}

    def context(name, available):
        return StageContext(cfg, specs[name], tmp_path / "run", tmp_path / "run" / name, None, available)

    assert shared_dir(context("sft_fast", stores)) == shared_dir(context("sft_fast", {}))  # SFT reads no store
    assert shared_dir(context("kd_fast", stores)) != shared_dir(context("kd_fast", {}))  # KD reads it
