"""Metrics on a user's own data: references from the answer field or the reply, auto choice, coverage."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kdpipe.data.encode import reference_reply
from kdpipe.eval import build_metric, score_predictions, with_references
from kdpipe.eval.metrics import AnswerMatch, ContainsReference, LossOnly, ReferenceMatch, UserMetric
from kdpipe.eval.plan import MetricNotApplicable, plan_evaluation
from tests.helpers import compose_cfg, third_party_chat, write_records


def chat_examples(numeric: bool = True, n: int = 12):
    return with_references([{**r, "answer": None} for r in third_party_chat(n, numeric=numeric)], "reasoning")


def replies(examples):
    return [e["reference"] for e in examples]


def shifted(examples):
    """The reference replies with every number moved by one: same shape, wrong answers."""
    out = []
    for e in examples:
        answer = int(AnswerMatch("the_answer_is").reference_of(e))
        out.append(e["reference"].replace(f"is {answer}.", f"is {answer + 1}."))
    return out


@pytest.mark.parametrize("extractor", ["last_number", "the_answer_is"])
def test_reference_replies_of_a_chat_file_score_all_and_shifted_answers_none(extractor):
    examples = chat_examples()
    metric = AnswerMatch(extractor)
    assert score_predictions(metric, examples, replies(examples))[0]["accuracy"] == 1.0
    assert score_predictions(metric, examples, shifted(examples))[0]["accuracy"] == 0.0


def test_the_answer_field_is_the_reference_when_present():
    example = with_references(
        [{"id": "a", "prompt": "2+2?", "responses": {"reasoning": "4"}, "answer": "1,000"}], "reasoning"
    )[0]
    metric = AnswerMatch("last_number")
    assert metric("so 1000.", example) == 1.0 and metric("so 4.", example) == 0.0
    details = metric.score("it is 1,000", example)
    assert (details.prediction, details.reference_answer) == ("1,000", "1,000")


def test_the_reference_reply_is_the_evaluated_style_s():
    example = {"id": "a", "prompt": "p", "responses": {"reasoning": "long 7", "fast": "7"}}
    assert reference_reply(example, "fast") == "7" and reference_reply(example, "reasoning") == "long 7"
    chat = third_party_chat(1)[0]
    assert reference_reply(chat, "fast") == chat["messages"][-1]["content"]  # chat: the last assistant turn
    assert reference_reply({"id": "b", "prompt": "p", "responses": {}}, "fast") is None


def test_examples_without_a_usable_reference_are_left_out_and_counted():
    examples = chat_examples(n=4)
    examples[0] = {**examples[0], "reference": "no number here"}
    summary, records = score_predictions(AnswerMatch("last_number"), examples, replies(examples))
    assert summary["accuracy"] == 1.0 and summary["scored_examples"] == 3 and summary["coverage"] == 0.75
    assert records[0]["score"] is None and records[1]["score"] == 1.0
    assert set(records[1]) >= {"id", "prompt", "reference", "reply", "prediction", "reference_answer", "score"}
    assert records[1]["prompt"].startswith("Tom has")  # the user turn, not null


def test_reference_match_and_contains_reference():
    example = with_references([{"id": "a", "prompt": "capital?", "responses": {"reasoning": "Paris."}}], "reasoning")[0]
    assert ReferenceMatch()("  paris ", example) == 1.0 and ReferenceMatch()("It is Paris.", example) == 0.0
    assert ContainsReference()("It is PARIS, of course", example) == 1.0
    assert ContainsReference()("Lyon", example) == 0.0


def test_auto_picks_by_data():
    arith = compose_cfg([]).data
    assert build_metric("auto", data_cfg=arith).name == "answer_match(answer_colon)"
    chat = compose_cfg(["data=jsonl_chat"]).data
    assert build_metric("auto", data_cfg=chat, examples=chat_examples()).name == "answer_match(last_number)"
    assert isinstance(build_metric("auto", data_cfg=chat, examples=chat_examples(numeric=False)), LossOnly)
    assert (
        build_metric("auto", extractor="boxed", data_cfg=chat, examples=chat_examples()).name == "answer_match(boxed)"
    )


def test_named_metrics_come_from_the_config_group():
    assert build_metric("answer_match", extractor="the_answer_is").name == "answer_match(the_answer_is)"
    assert build_metric("answer_match", data_cfg=compose_cfg([]).data).name == "answer_match(answer_colon)"
    assert build_metric("answer_match").name == "answer_match(last_number)"  # auto off the built-in task
    assert isinstance(build_metric("contains_reference"), ContainsReference)
    assert not build_metric("loss").generates
    with pytest.raises(ValueError, match="choose one of"):
        build_metric("bleu")


def user_metric(prediction: str, example: dict) -> float | None:
    """A user's metric: 1 when the reply is as long as the reference, None without a reference."""
    return None if example.get("reference") is None else float(len(prediction) == len(example["reference"]))


def test_a_user_target_metric_runs():
    metric = build_metric({"_target_": "tests.unit.eval.test_metrics.user_metric", "_partial_": True})
    assert isinstance(metric, UserMetric) and metric.name == "tests.unit.eval.test_metrics.user_metric"
    examples = chat_examples(n=3)
    summary, _ = score_predictions(metric, examples, [*replies(examples)[:2], "x"])
    assert summary["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not a callable"):
        build_metric({"_target_": "builtins.str", "_args_": ["x"]})  # a value, not a metric


def test_a_scoring_metric_without_any_reference_is_not_applicable_but_loss_is(tmp_path):
    path = write_records(tmp_path / "chat.jsonl", third_party_chat(4, numeric=False))  # no answers, no numbers
    data = compose_cfg(["data=jsonl_chat", f"data.files.test={path}"]).data
    with pytest.raises(MetricNotApplicable, match=r"answer_match\(boxed\) has nothing to compare with.*chat.jsonl"):
        plan_evaluation(data, OmegaConf.create({"metric": "answer_match", "extractor": "boxed"}), "reasoning")
    plan = plan_evaluation(data, OmegaConf.create({"metric": "auto"}), "reasoning")
    assert isinstance(plan.metric, LossOnly) and "loss only" in plan.note
