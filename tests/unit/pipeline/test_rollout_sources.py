"""Stage seeds derive from the run's seed and the stage's name; rollout sets are found by the stage that wrote
them (``rollouts_from``, ``data_from``, ``onpolicy_from``); prompt-only records are read by rollouts and
refused by stages that need labels. Everything here is decided before any stage runs (nothing trains)."""

from __future__ import annotations

import pytest

from kdpipe.cli.train import train
from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.runner import prepare
from kdpipe.pipeline.spec import resolve_stages, score_slots, stage_seed
from kdpipe.pipeline.stages import STAGE_KINDS, StageContext
from tests.helpers import TEACHER_ROLLOUTS, added_stage, chat_data_overrides, third_party_chat, write_records

STUDENT_TOO = "pipeline.stages.score_rollouts_fast.rollouts_from=rollout_fast"


def seeds(cfg) -> list[tuple[str, int]]:
    specs = resolve_stages(cfg, set(STAGE_KINDS))
    return [(s.instance, StageContext(cfg, s, None, None, None, order=specs).seed) for s in specs]


def refused(tiny_cfg, tmp_path, *overrides, match: str) -> str:
    with pytest.raises(PipelineConfigError, match=match) as caught:
        train(tiny_cfg(*overrides))
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("0*_*"))
    return str(caught.value)


# --- seeds --------------------------------------------------------------------------------------------------


def test_a_stage_gets_the_same_seed_in_every_preset(tiny_cfg):
    short = dict(seeds(tiny_cfg("pipeline/preset=sft_r_sft_f_kd_f")))
    long = dict(seeds(tiny_cfg("pipeline/preset=alternation_onpolicy")))
    common = set(short) & set(long)
    assert {"score", "sft_reasoning", "sft_fast"} <= common
    assert all(short[name] == long[name] for name in common)  # though most sit at another index
    assert len(set(long.values())) == len(long)  # and no two stages share one
    # the same function of (run seed, name) everywhere: a sha256, not Python's salted hash()
    assert short["sft_fast"] == stage_seed(1234, "sft_fast") == 282392947
    assert dict(seeds(tiny_cfg("pipeline/preset=sft_r_sft_f_kd_f", "seed=7")))["sft_fast"] == stage_seed(7, "sft_fast")


def test_a_repeated_stage_gets_a_seed_per_entry_and_a_pinned_seed_wins(tiny_cfg):
    twice = seeds(tiny_cfg("pipeline.order=[sft_fast,sft_reasoning,sft_fast]"))
    once = dict(seeds(tiny_cfg("pipeline.order=[sft_reasoning,sft_fast]")))
    assert [name for name, _ in twice] == ["sft_fast", "sft_reasoning", "sft_fast#2"]
    assert twice[0][1] == once["sft_fast"] and twice[1][1] == once["sft_reasoning"]
    assert twice[2][1] == stage_seed(1234, "sft_fast#2") != twice[0][1]
    pinned = seeds(tiny_cfg("pipeline.order=[sft_fast,sft_fast]", "pipeline.stages.sft_fast.seed=5"))
    assert [seed for _, seed in pinned] == [5, 5]


# --- rollout sets by stage ----------------------------------------------------------------------------------


def test_a_score_stage_scores_the_rollout_set_it_names(tiny_cfg):
    order = "pipeline.order=[teacher_sft,rollout_teacher,rollout_fast,score_teacher_rollouts,score_rollouts_fast]"
    cfg = tiny_cfg(*TEACHER_ROLLOUTS, order, STUDENT_TOO)
    specs = resolve_stages(cfg, set(STAGE_KINDS))
    assert score_slots(specs, 3) == [("fast", "rollouts", "rollout_teacher")]
    assert score_slots(specs, 4) == [("fast", "rollouts", "rollout_fast")]  # the same style: another slot
    prepare(cfg)  # nothing refused


def test_two_rollout_stages_of_one_style_need_rollouts_from(tiny_cfg, tmp_path):
    order = "pipeline.order=[teacher_sft,rollout_teacher,rollout_fast,score_rollouts_fast,kd_fast_onpolicy]"
    message = refused(tiny_cfg, tmp_path, *TEACHER_ROLLOUTS, order, match="cannot start")
    assert (
        "stage 'score_rollouts_fast' (score) reads a rollout set of style 'fast' and 2 rollout stages sample it "
        "before it (['rollout_teacher', 'rollout_fast']): set pipeline.stages.score_rollouts_fast.rollouts_from"
    ) in message
    assert "set pipeline.stages.kd_fast_onpolicy.onpolicy_from to one of them" in message


def test_a_rollouts_from_that_names_no_earlier_rollout_stage_or_another_style_is_refused(tiny_cfg, tmp_path):
    order = "pipeline.order=[teacher_sft,rollout_reasoning,score_rollouts_fast,kd_fast]"
    message = refused(
        tiny_cfg,
        tmp_path,
        order,
        "pipeline.stages.score_rollouts_fast.rollouts_from=rollout_fats",
        "pipeline.stages.kd_fast.data_from=rollout_reasoning",
        match="cannot start",
    )
    assert "rollouts_from='rollout_fats': no `rollout` stage of that name runs before stage" in message
    assert (
        "pipeline.stages.kd_fast.data_from='rollout_reasoning': that rollout stage samples style 'reasoning', but "
        "stage 'kd_fast' reads style 'fast'"
    ) in message
    labels = refused(tiny_cfg, tmp_path, "pipeline.stages.score.rollouts_from=rollout_fast", match="cannot start")
    assert "pipeline.stages.score.rollouts_from='rollout_fast' applies to sequences: rollouts only" in labels


def test_kd_on_a_rollout_set_needs_the_teacher_store_scored_on_it(tiny_cfg, tmp_path):
    message = refused(
        tiny_cfg,
        tmp_path,
        *TEACHER_ROLLOUTS,
        "pipeline.order=[teacher_sft,score,rollout_teacher,kd_synthetic]",
        match="cannot start",
    )
    assert (
        "stage 'kd_synthetic' (kd) reads a teacher store of the rollout set of stage 'rollout_teacher' (style "
        "'fast') that no earlier stage writes: put a `score` stage with sequences: rollouts and rollouts_from: "
        "rollout_teacher"
    ) in message
    # the label store of fast (stage `score`) is not it; with the store scored on the set, the run starts
    prepare(
        tiny_cfg(*TEACHER_ROLLOUTS, "pipeline.order=[teacher_sft,rollout_teacher,score_teacher_rollouts,kd_synthetic]")
    )


def test_withheld_labels_leave_only_correct_to_a_task_that_can_check_without_them(tiny_cfg, tmp_path):
    only_correct = "pipeline.stages.rollout_teacher.filters.only_correct=true"
    order = "pipeline.order=[teacher_sft,rollout_teacher]"
    prepare(tiny_cfg(*TEACHER_ROLLOUTS, order, only_correct))  # the built-in task solves its prompts
    chat = write_records(tmp_path / "chat.jsonl", third_party_chat(8))
    message = refused(
        tiny_cfg, tmp_path, *TEACHER_ROLLOUTS, order, only_correct, *chat_data_overrides(chat), match="cannot start"
    )
    assert "stage 'rollout_teacher' withholds the labels (withhold_labels) and keeps only correct responses" in message


# --- prompt-only records ------------------------------------------------------------------------------------


def prompt_only_data(tmp_path):
    """A train split of prompt-only records after two labelled ones (the val and test splits: labelled)."""
    labelled = write_records(tmp_path / "labelled.jsonl", third_party_chat(6))
    questions = [{"id": f"u{i}", "prompt": f"Tom has {i} apples and buys 2 more. How many now?"} for i in range(6)]
    train = write_records(tmp_path / "prompts.jsonl", [*third_party_chat(2), *questions])
    return train, [*chat_data_overrides(labelled), f"data.files.train={train}"]


def test_prompt_only_records_are_read_by_a_rollout_and_refused_by_sft_naming_the_line(tiny_cfg, tmp_path):
    train_file, data = prompt_only_data(tmp_path)
    rollout = [*data, "pipeline.order=[rollout_fast]"]
    prepare(tiny_cfg(*rollout))  # a rollout needs no labels
    message = refused(tiny_cfg, tmp_path, *data, "pipeline.order=[sft_fast]", match="prompt-only")
    assert (
        f"data split 'train' (read by sft_fast) has 6 prompt-only record(s) with no response to train on or score, "
        f"the first at {train_file}:3: only `rollout` stages read prompt-only records"
    ) in message
    scored = refused(tiny_cfg, tmp_path, *data, "pipeline.order=[score]", match="prompt-only")
    assert "(read by score)" in scored
    # trained on a rollout set instead (data_from), the stage reads no prompt-only record
    prepare(tiny_cfg(*data, *added_stage("sft_on_rollouts", "sft", style="fast", data_from="rollout_fast"),
                     "pipeline.order=[rollout_fast,sft_on_rollouts]"))  # fmt: skip


def test_an_evaluation_refuses_prompt_only_records_it_cannot_score(tiny_cfg, tmp_path):
    train_file, data = prompt_only_data(tmp_path)
    on_prompts = [*data, "pipeline.order=[eval_student]", "pipeline.stages.eval_student.eval.split=train"]
    with pytest.raises(PipelineConfigError, match="prompt-only") as caught:
        prepare(tiny_cfg(*on_prompts))
    assert "eval.split='train' has 6 prompt-only record(s) that eval.metric=" in str(caught.value)
    assert f"the first at {train_file}:3" in str(caught.value)
    answered = [{"id": f"a{i}", "prompt": f"{i}+2?", "answer": i + 2} for i in range(4)]
    file = write_records(tmp_path / "answered.jsonl", answered)
    prepare(tiny_cfg(*on_prompts, f"data.files.train={file}"))  # an `answer` is what answer_match compares with
