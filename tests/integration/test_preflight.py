"""Faults and bad input, each refused before any stage trains (no stage folder exists) with a message naming
the cause, or survived: a broken reusable store is set aside and rescored, a shard write that fails leaves no
half-written file, a kill between the two renames of an export resumes, a second resume of a run is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kdpipe.utils.io as io
from kdpipe.cli.train import train
from kdpipe.errors import PipelineConfigError
from kdpipe.store.reader import StoreError
from kdpipe.store.writer import MANIFEST
from kdpipe.utils.claim import SharedLock
from tests.helpers import (
    assert_same_weights,
    chat_data_overrides,
    crash_override,
    run_cli,
    store_of,
    third_party_chat,
    write_records,
)


def refused(tiny_cfg, tmp_path, *overrides, match: str, run_dir: Path | None = None) -> str:
    """Train, expect a refusal matching ``match`` and no stage folder; return the message."""
    run_dir = run_dir or tmp_path / "run"
    with pytest.raises(PipelineConfigError, match=match) as caught:
        train(tiny_cfg(*overrides, run_dir=run_dir))
    assert not list(run_dir.glob("0*_*/export")), "a stage trained before the refusal"
    return str(caught.value)


def test_bad_test_split_is_refused_before_the_teacher_trains(tiny_cfg, tmp_path):
    good = write_records(tmp_path / "good.jsonl", third_party_chat(6))
    bad = write_records(tmp_path / "bad.jsonl", [*third_party_chat(2), '{"messages": [}'])
    overrides = [*chat_data_overrides(good), f"data.files.test={bad}"]
    message = refused(tiny_cfg, tmp_path, *overrides, match="data split 'test'")
    assert f"{bad}:3" in message and "invalid JSON" in message
    assert not (tmp_path / "run" / "01_teacher_sft").exists()


@pytest.mark.parametrize("value", [0, -1])
def test_max_steps_below_one_is_refused_with_every_other_problem(tiny_cfg, tmp_path, value):
    message = refused(
        tiny_cfg,
        tmp_path,
        f"pipeline.stages.sft_fast.max_steps={value}",
        "pipeline.stages.kd_fast.onpolicy_lambda=1.5",
        "pipeline.stages.score.k=0",
        match="cannot start",
    )
    assert f"pipeline.stages.sft_fast.max_steps={value}: must be an integer >= 1" in message
    assert "pipeline.stages.kd_fast.onpolicy_lambda=1.5: must be in [0, 1]" in message
    assert "pipeline.stages.score.k=0" in message


def test_k_above_the_teachers_vocabulary_is_refused_before_the_teacher_trains(tiny_cfg, tmp_path):
    message = refused(tiny_cfg, tmp_path, "pipeline.stages.score.k=100000", match="vocabulary")
    assert "pipeline.stages.score.k=100000: more than models.teacher's vocabulary of" in message


def test_an_unwritable_store_root_is_refused_up_front(tiny_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # the tests run as root, where chmod does not stop writes: a file does
    message = refused(tiny_cfg, tmp_path, f"pipeline.stages.score.store_root={blocker}/stores", match="not writable")
    assert "pipeline.stages.score.store_root" in message


def test_a_kd_store_path_that_is_not_a_store_is_refused(tiny_cfg, tmp_path):
    message = refused(
        tiny_cfg, tmp_path, "pipeline.order=[kd_fast]", f"pipeline.stages.kd_fast.store={tmp_path}", match="store"
    )
    assert f"pipeline.stages.kd_fast.store={tmp_path}" in message and "not a finished teacher store" in message


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_a_store_with_a_truncated_manifest_is_set_aside_and_rescored(tiny_cfg, tmp_path):
    order = "pipeline.order=[teacher_sft,score]"
    first = train(tiny_cfg(order, run_dir=tmp_path / "first"))
    store = store_of(first, "score", "fast")
    manifest = (store / MANIFEST).read_text()
    (store / MANIFEST).write_text(manifest[: len(manifest) // 2])
    second = train(tiny_cfg(order, run_dir=tmp_path / "second"))
    assert store_of(second, "score", "fast") == store and (store / MANIFEST).read_text() == manifest
    (aside,) = store.parent.glob(f"{store.name}.broken-*")
    assert "BROKEN.txt" in {p.name for p in aside.iterdir()}


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_a_flipped_byte_in_a_finished_store_is_refused_when_resuming(tiny_cfg, tmp_path):
    order = "pipeline.order=[teacher_sft,score,kd_fast]"
    crash = crash_override("03_kd_fast", 2, tmp_path / "crashed.marker")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(order, crash))
    store = json.loads((tmp_path / "run" / "02_score" / "metrics.json").read_text())["artifacts"]["stores"][1]["path"]
    shard = sorted(Path(store).glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineConfigError, match=rf"checksum mismatch in shard {shard.name}"):
        train(tiny_cfg(f"resume={tmp_path / 'run'}"))
    with pytest.raises(StoreError, match="checksum mismatch"):  # sizes only: it starts, and the read finds it
        train(tiny_cfg(f"resume={tmp_path / 'run'}", "store_verify=size"))


def test_an_identical_resume_passes_the_strict_check_and_a_change_is_named(tiny_cfg, tmp_path):
    crash = crash_override("01_sft_fast", 2, tmp_path / "crashed.marker")
    base = ["pipeline.order=[sft_fast]", "pipeline.stages.sft_fast.checkpoint_every_n_steps=2"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*base, crash))
    run = tmp_path / "run"
    with pytest.raises(PipelineConfigError, match=r"pipeline.stages.sft_fast.max_steps: 6 -> 600.*seed: 1234 -> 7"):
        train(tiny_cfg(*base, crash, "pipeline.stages.sft_fast.max_steps=600", "seed=7", f"resume={run}",
                       "resume_overrides=error"))  # fmt: skip
    done = train(tiny_cfg(*base, crash, f"resume={run}", "resume_overrides=error"))  # the same command: accepted
    assert done.result("sft_fast").metrics["steps"] == 6


def test_resume_auto_starts_an_empty_folder_and_continues_a_crashed_run_in_it(tiny_cfg, tmp_path):
    crash = crash_override("01_sft_fast", 2, tmp_path / "crashed.marker")
    base = ["pipeline.order=[sft_fast]", "pipeline.stages.sft_fast.checkpoint_every_n_steps=2", "resume=auto"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*base, crash))  # the folder held no run: a new one starts in it
    assert (tmp_path / "run" / "config.yaml").exists()
    done = train(tiny_cfg(*base, crash))  # the same command again: the run in the folder is continued
    assert done.result("sft_fast").metrics["steps"] == 6
    again = train(tiny_cfg(*base))  # finished: every stage is skipped, the results stay
    assert again.result("sft_fast").metrics["steps"] == 6


def test_a_second_kdpipe_train_on_a_locked_run_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg("pipeline.order=[eval_student]"))
    lock = SharedLock(tmp_path / "run" / "run")
    assert lock.try_acquire()  # as a running kdpipe-train holds it
    try:
        with pytest.raises(PipelineConfigError, match="is in use by another kdpipe-train"):
            train(tiny_cfg(f"resume={tmp_path / 'run'}"))
    finally:
        lock.release()
    train(tiny_cfg(f"resume={tmp_path / 'run'}"))  # released: it resumes


def test_a_failing_shard_write_leaves_no_partial_file_and_the_rerun_completes(tiny_cfg, tmp_path, monkeypatch):
    import kdpipe.store.writer as writer

    real = writer.save_file

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")  # some bytes made it to disk, then the device filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_cfg("pipeline.order=[teacher_sft,score]"))
    stores = tmp_path / "logs" / "stores"
    assert not [p for p in stores.rglob("*") if p.is_file() and p.suffix == ".safetensors"]  # no partial shard
    monkeypatch.setattr(writer, "save_file", real)
    train(tiny_cfg(f"resume={tmp_path / 'run'}"))


def test_a_kill_between_the_two_renames_of_an_export_resumes(tiny_cfg, tmp_path, monkeypatch):
    overrides = ["pipeline.order=[sft_fast]"]
    reference = train(tiny_cfg(*overrides, run_dir=tmp_path / "reference"))
    real = io.atomic_replace_dir

    def killed_midway(tmp_dir, final_dir):
        if Path(final_dir).exists():  # the first rename (the old export aside) happens, then the process dies
            io.os.replace(final_dir, io.temp_beside(final_dir, ".old"))
        raise KeyboardInterrupt("killed between the renames")

    # a run whose export already exists (resumed after its first export), killed while replacing it
    train(tiny_cfg(*overrides, run_dir=tmp_path / "run"))
    state = json.loads((tmp_path / "run" / "pipeline_state.json").read_text())
    state["stages"][0]["status"] = "running"  # as if killed before the state recorded the stage done
    (tmp_path / "run" / "pipeline_state.json").write_text(json.dumps(state))
    monkeypatch.setattr(io, "atomic_replace_dir", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(f"resume={tmp_path / 'run'}"))
    assert not (tmp_path / "run" / "01_sft_fast" / "export").exists()
    monkeypatch.setattr(io, "atomic_replace_dir", real)
    train(tiny_cfg(f"resume={tmp_path / 'run'}"))
    assert_same_weights(reference.result("sft_fast").export, tmp_path / "run" / "01_sft_fast" / "export")


def test_a_sweep_checks_every_job_before_the_first_trains(tiny_cfg, tmp_path):
    args = tiny_cfg.args("pipeline.order=[sft_fast]", "pipeline.stages.sft_fast.max_steps=2,0")
    proc = run_cli("kdpipe-train", "-m", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "1 of 2 sweep jobs cannot start" in proc.stderr
    assert "pipeline.stages.sft_fast.max_steps=0: must be an integer >= 1" in proc.stderr
    assert not list(tmp_path.rglob("01_sft_fast"))  # job 0 did not train either
