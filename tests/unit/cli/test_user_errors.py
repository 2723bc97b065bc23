"""One clean line per user error, in process: the kind each error gets, the tracebacks KDPIPE_DEBUG asks for,
the command line's unknown keys (did you mean), and which run folders a refused command removes."""

from __future__ import annotations

import errno
import os
import time

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.fabric.utilities.exceptions import MisconfigurationException

from kdpipe.cli.errors import error_line, exit_on_user_error, raising_hydra_errors, user_error
from kdpipe.cli.overrides import check_overrides, override_args
from kdpipe.cli.rundir import is_stray, remove_if_stray
from kdpipe.data.records import DataError, Problem
from kdpipe.errors import KdpipeError, PipelineConfigError
from kdpipe.store.reader import StoreError

# --- kinds -----------------------------------------------------------------------------------------------------

KINDS = [
    (PipelineConfigError("pipeline.order[0] names unknown stage 'x'"), "config"),
    (DataError("1 invalid record(s) in data.files.train", [Problem("t.jsonl", "bad", 3)]), "data"),
    (StoreError("teacher store s: checksum mismatch in shard 0.safetensors"), "store"),
    (MisconfigurationException("`Trainer(devices=0)` value is not a valid input"), "config"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/logs"), "permission"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/logs"), "permission"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/x"), "disk"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file/logs"), "file"),
    (FileNotFoundError("data.files.train: no such file or directory 'x.jsonl'"), "file"),
]


@pytest.mark.parametrize(("err", "kind"), KINDS, ids=[kind for _, kind in KINDS])
def test_each_user_error_has_its_kind(err, kind):
    assert user_error(err)[0] == kind
    line = error_line("kdpipe-train", err)
    assert line.startswith(f"kdpipe-train: {kind} error: ")
    assert "[Errno" not in line  # the OS's errors said plainly: "Permission denied: '/ro/logs'"


def test_a_data_error_keeps_its_records_after_the_first_line():
    err = DataError("2 invalid record(s) in data.files.train (t.jsonl):", [Problem("t.jsonl:2", "x", 7)] * 2)
    first, *rest = error_line("kdpipe-train", err).splitlines()
    assert first == "kdpipe-train: data error: 2 invalid record(s) in data.files.train (t.jsonl):"
    assert rest == ["  t.jsonl:2:7: x"] * 2
    assert isinstance(err, ValueError) and isinstance(err, KdpipeError)


def test_a_bug_is_not_a_user_error():
    assert user_error(ValueError("invalid literal for int()")) is None
    assert user_error(OSError(errno.EIO, "Input/output error", "/x")) is None
    assert user_error(KeyError("seed")) is None  # only where a command names it: kdpipe-eval's data keys
    assert user_error(KeyError("seed"), extra=((KeyError, "config"),)) == ("config", "seed")


def test_exit_on_user_error_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("KDPIPE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exited, exit_on_user_error("kdpipe-score"):
        raise PipelineConfigError("k=0 must be in [1, vocab size 50]")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "kdpipe-score: config error: k=0 must be in [1, vocab size 50]\n"
    with pytest.raises(ZeroDivisionError), exit_on_user_error("kdpipe-score"):  # a bug keeps its traceback
        raise ZeroDivisionError


@pytest.mark.parametrize("variable", ["KDPIPE_DEBUG", "HYDRA_FULL_ERROR"])
def test_debug_variables_show_the_traceback(monkeypatch, variable):
    monkeypatch.delenv("KDPIPE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(PipelineConfigError), exit_on_user_error("kdpipe-train"):
        raise PipelineConfigError("x")


def test_hydra_raising_for_us_is_not_the_user_asking_for_tracebacks(monkeypatch, capsys):
    monkeypatch.delenv("KDPIPE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with raising_hydra_errors():
        assert os.environ["HYDRA_FULL_ERROR"] == "1"
        with pytest.raises(SystemExit), exit_on_user_error("kdpipe-train"):
            raise PipelineConfigError("x")
    assert "HYDRA_FULL_ERROR" not in os.environ
    assert capsys.readouterr().err == "kdpipe-train: config error: x\n"


# --- unknown keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sed=3"], "unknown key 'sed' (did you mean 'seed'?)"),
        (["+sed=3"], "unknown key 'sed' (did you mean 'seed'?)"),
        (["++sed.x=3"], "unknown key 'sed' (did you mean 'seed'?)"),
        (["datta=arith"], "unknown key 'datta' (did you mean 'data'?)"),
        (
            ["pipeline.stages.kd_fast.loss.ce_wieght=0"],
            "unknown key 'pipeline.stages.kd_fast.loss.ce_wieght' "
            "(did you mean 'pipeline.stages.kd_fast.loss.ce_weight'?)",
        ),
        (["data=jsonl_chat", "data.rols.a=b"], "unknown key 'data.rols' (did you mean 'data.roles'?)"),
        (["data_size=scarce"], "unknown key 'data_size' (did you mean 'data'?)"),  # the experiment's key
        (["-m", "pipeline=tiny,default", "seed=1,2", "+sed=4"], "unknown key 'sed'"),
    ],
)
def test_an_unknown_key_is_refused_with_the_closest_known_one(args, message):
    with pytest.raises(PipelineConfigError) as err:
        check_overrides(args, "train")
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    "args",
    [
        ["seed=3", "debug=fast", "print_config=false"],
        ["data=jsonl_chat", "data.files.train=x.jsonl", "data.on_error=skip"],  # a group's keys
        ["+stage@pipeline.stages.x=eval", "pipeline.stages.x.model=student", "pipeline.order=[x]"],
        ["+callbacks.crash={_target_: tests.helpers.CrashAt}"],  # adding inside a known key
        ["experiment=kd_vs_sft_data_scale", "data_size=scarce"],  # a key the chosen experiment brings
        ["model@models.student=hf", "models.student.path=x"],
        ["hydra.run.dir=/tmp/x", "hydra/job_logging=stdout", "hydra.output_subdir=null"],
        ["-m", "seed=1,2", "pipeline=tiny,default"],
        ["paths.run_dir=/tmp/run", "~experiment"],
    ],
)
def test_known_keys_groups_and_hydra_settings_pass(args):
    check_overrides(args, "train")


def test_eval_keys_are_checked_against_the_eval_config():
    with pytest.raises(PipelineConfigError, match=r"unknown key 'modle_path' \(did you mean 'model_path'\?\)"):
        check_overrides(["modle_path=x"], "eval")
    check_overrides(["model_path=x", "limit=3", "data=arith", "data.n_test_per_level=2"], "eval")


def test_flags_and_their_values_are_not_overrides():
    assert override_args(["-m", "--cfg", "job", "seed=1", "-p", "data", "x=2"]) == ["seed=1", "x=2"]
    assert override_args(["--config-name", "other", "sed=3"]) is None  # another primary config: not checked
    assert OverridesParser.create().parse_overrides(override_args(["--resolve", "a.b=1"]))[0].key_or_group == "a.b"


# --- stray run folders -----------------------------------------------------------------------------------------


def hydra_run_dir(path, *files):
    """What Hydra (and a command refused before its first stage) leaves in a run folder."""
    (path / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (path / ".hydra" / name).write_text("{}\n")
    for name in ("train.log", *files):
        (path / name).write_text("")
    return path


def test_a_folder_with_only_the_commands_own_files_goes(tmp_path):
    started = time.time()
    run = hydra_run_dir(tmp_path / "run", "config.yaml", "pipeline_state.json", "config_tree.log")
    assert is_stray(run, started, "train.log")
    assert remove_if_stray(run, started, "train.log") and not run.exists()


def test_a_stage_folder_or_an_older_file_keeps_the_folder(tmp_path):
    started = time.time()
    with_stage = hydra_run_dir(tmp_path / "a")
    (with_stage / "01_sft_fast").mkdir()
    assert not remove_if_stray(with_stage, started, "train.log") and with_stage.exists()
    users = hydra_run_dir(tmp_path / "b", "config.yaml")
    os.utime(users / "config.yaml", (started - 3600, started - 3600))  # there before the command
    assert not remove_if_stray(users, started, "train.log") and (users / "config.yaml").exists()


def test_a_resumed_run_is_never_removed_and_keeps_the_new_job_log(tmp_path):
    started = time.time()
    resumed = hydra_run_dir(tmp_path / "old")
    assert not remove_if_stray(resumed, started, "train.log", resumed=resumed) and resumed.exists()
    new = hydra_run_dir(tmp_path / "new")
    (new / "train.log").write_text("resumed: stage 02\n")
    assert remove_if_stray(new, started, "train.log", resumed=resumed) and not new.exists()
    assert (resumed / "train.log").read_text() == "resumed: stage 02\n"


def test_the_working_folder_and_an_old_empty_folder_stay(tmp_path, monkeypatch):
    started = time.time()
    old = tmp_path / "old"
    old.mkdir()
    os.utime(old, (started - 3600, started - 3600))
    assert not remove_if_stray(old, started, "train.log") and old.exists()
    here = hydra_run_dir(tmp_path / "here")
    monkeypatch.chdir(here)  # hydra.run.dir=.
    assert not remove_if_stray(here, started, "train.log") and here.exists()
