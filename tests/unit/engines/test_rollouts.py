"""Sampling a rollout set (kdpipe.engines.rollouts): ids that link each response to its prompt, and resuming an
interrupted set to the same files."""

from __future__ import annotations

import shutil

import pytest
import torch

from kdpipe.data.arith import generate_split
from kdpipe.data.rollouts import RolloutSettings, load_rollouts, part_path, prompt_id_of
from kdpipe.engines.rollouts import write_rollouts
from tests.helpers import tiny_lm


@pytest.fixture(scope="module")
def prompts():
    return generate_split("val", 3, seed=0)  # 15 prompts over 5 levels


def test_rollout_ids_link_each_response_to_its_prompt(tokenizer, prompts, tmp_path, one_thread):
    settings = RolloutSettings(style="reasoning", n_samples=3, max_new_tokens=12, part_size=4, seed=7,
                               drop_truncated=False)  # fmt: skip
    manifest = write_rollouts(tmp_path, tiny_lm(tokenizer), tokenizer, prompts, settings)
    records = load_rollouts(tmp_path)
    assert manifest["samples"] == len(records) == 3 * len(prompts)
    assert manifest["parts"] == 4  # ceil(15 / 4)
    by_id = {p["id"]: p for p in prompts}
    assert len({r["id"] for r in records}) == len(records)  # ids are unique
    for r in records:
        prompt = by_id[r["prompt_id"]]
        assert prompt_id_of(r["id"]) == r["prompt_id"]
        assert r["prompt"] == prompt["prompt"] and r["level"] == prompt["level"] and r["answer"] == prompt["answer"]
        assert set(r["responses"]) == {"reasoning"} and 0 <= r["sample"] < 3
    # sampling is not greedy: the samples of one prompt differ (untrained model, T=1)
    assert len({r["responses"]["reasoning"] for r in records if r["prompt_id"] == prompts[0]["id"]}) > 1


def test_a_resumed_rollout_writes_the_same_dataset(tokenizer, prompts, tmp_path, one_thread):
    settings = RolloutSettings(style="fast", n_samples=2, max_new_tokens=10, part_size=4, seed=3,
                               drop_truncated=False)  # fmt: skip
    model = tiny_lm(tokenizer)
    write_rollouts(tmp_path / "full", model, tokenizer, prompts, settings)
    # an interrupted run: two parts on disk, no manifest; the resumed run samples only what is missing
    (tmp_path / "cut").mkdir()
    for index in range(2):
        shutil.copy(part_path(tmp_path / "full", index), part_path(tmp_path / "cut", index))
    kept_mtime = part_path(tmp_path / "cut", 0).stat().st_mtime_ns
    torch.manual_seed(12345)  # whatever the global RNG was, each part reseeds itself
    write_rollouts(tmp_path / "cut", model, tokenizer, prompts, settings)
    assert part_path(tmp_path / "cut", 0).stat().st_mtime_ns == kept_mtime
    for index in range(4):
        assert part_path(tmp_path / "cut", index).read_bytes() == part_path(tmp_path / "full", index).read_bytes()
    assert load_rollouts(tmp_path / "cut") == load_rollouts(tmp_path / "full")
