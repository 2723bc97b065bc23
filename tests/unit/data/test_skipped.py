"""Invalid records where editors jump to (``file:line:column`` for broken JSON), and every record that
``data.on_error=skip`` drops, per split: all of them listed, each split counted."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from kdpipe.data.datamodule import PostTrainDataModule, write_skipped_records
from kdpipe.data.records import DataError
from kdpipe.data.sources import jsonl_rows, load_split
from tests.helpers import compose_cfg

GOOD = {"prompt": "2+2?", "response": "Answer: 4"}


def broken_json_at(tmp_path, line: str, newline: str = "\n", bom: bool = False):
    """The (where, column, message) of the one problem a file of a good line and ``line`` has."""
    path = tmp_path / "t.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (json.dumps(GOOD) + newline + line + newline).encode())
    cfg = OmegaConf.create({"source": "jsonl", "files": {"train": str(path)}})
    with pytest.raises(DataError) as err:
        load_split(cfg, "train")
    (problem,) = err.value.problems
    return problem, path


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_json_cut_off_at_the_end_of_its_line_is_reported_at_that_column(tmp_path, newline):
    line = '{"prompt": "x", "response": '  # 28 characters: the value is missing at column 29
    problem, path = broken_json_at(tmp_path, line, newline)
    assert (problem.where, problem.column) == (f"{path}:2", len(line) + 1)
    assert str(problem) == f"{path}:2:29: invalid JSON: Expecting value"


def test_json_broken_inside_its_line_and_after_a_bom(tmp_path):
    problem, path = broken_json_at(tmp_path, '{"prompt" "x"}', bom=True)
    assert problem.location == f"{path}:2:11" and "Expecting ':' delimiter" in problem.message
    rows = list(jsonl_rows(path))
    assert rows[0] == (f"{path}:1", GOOD)  # the BOM is not part of the first record


def skipping_cfg(tmp_path):
    """``data=jsonl_chat`` with 8 bad records over the three splits (3 in train, 2 in val, 3 in test)."""
    bad = ["{oops", {"prompt": "x", "response": 3}, {"response": "y"}]
    files = {}
    for split, problems in (("train", bad), ("val", bad[:2]), ("test", bad)):
        records = [{**GOOD, "id": f"{split}{i}"} for i in range(3)] + problems
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    overrides = [f"data.files.{split}={path}" for split, path in files.items()]
    return compose_cfg(["data=jsonl_chat", "data.on_error=skip", *overrides]), files


def test_every_skipped_record_of_every_split_is_listed_and_counted(tokenizer, tmp_path):
    cfg, files = skipping_cfg(tmp_path)
    dm = PostTrainDataModule(
        tokenizer, data=cfg.data, style="fast", curriculum=cfg.curriculum, batch_size=2, num_batches=2, seed=0
    )
    dm.setup("fit")  # train and val
    skipped = dm.skipped_records(["train", "val", "test"])  # test: the evaluation's split, read now
    assert {split: len(problems) for split, problems in skipped.items()} == {"train": 3, "val": 2, "test": 3}
    assert dm.skipped_invalid == {"train": 3, "val": 2}  # as before: what the module itself loaded
    out = write_skipped_records(tmp_path / "stage" / "skipped_records.jsonl", skipped)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 8
    assert lines[0]["where"] == f"{files['train']}:4:2" and lines[0]["reason"].startswith("invalid JSON: Expecting")
    reason = "'response' must be a string or an object of style variants, got int 3"
    assert lines[1] == {"split": "train", "where": f"{files['train']}:5", "reason": reason}
    assert [line["split"] for line in lines] == ["train"] * 3 + ["val"] * 2 + ["test"] * 3


def test_nothing_skipped_writes_no_file(tmp_path):
    assert write_skipped_records(tmp_path / "skipped_records.jsonl", {"train": [], "val": []}) is None
    assert not (tmp_path / "skipped_records.jsonl").exists()
