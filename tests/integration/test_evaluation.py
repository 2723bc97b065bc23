"""Evaluation on a user's own chat data, end to end: the pipeline scores it with a metric that applies (or
refuses one that cannot, before training), and ``kdpipe-eval`` re-scores an export or external replies."""

from __future__ import annotations

import json

import pytest

from kdpipe.cli.eval import evaluate
from kdpipe.cli.train import train
from kdpipe.errors import DataError, PipelineConfigError
from tests.helpers import chat_data_overrides, compose_cfg, run_cli, third_party_chat, write_records


@pytest.fixture
def chat_file(tmp_path):
    return write_records(tmp_path / "chat.jsonl", third_party_chat(12))


def test_a_chat_pipeline_scores_its_own_data_and_kdpipe_eval_follows_the_run(tiny_cfg, tmp_path, chat_file):
    run = train(tiny_cfg(*chat_data_overrides(chat_file), "pipeline.order=[sft_fast]"))
    metrics = run.result("sft_fast").metrics
    assert metrics["metric"] == "answer_match(last_number)"  # auto: the references end with numbers
    assert metrics["coverage"] == 1.0 and metrics["accuracy"] is not None and metrics["loss"] > 0
    assert metrics["eval_data"]["source"] == "jsonl" and metrics["eval_data"]["file"] == str(chat_file)
    stage = tmp_path / "run" / "01_sft_fast"
    record = json.loads((stage / "generations.jsonl").read_text().splitlines()[0])
    assert record["prompt"].startswith("Tom has") and record["reference"].startswith(record["reference"][:3])
    assert record["reference_answer"] is not None and record["score"] in (0.0, 1.0)

    # kdpipe-eval on the export, no data=: the run's chat data, style and metric, not the built-in task
    run_cli("kdpipe-eval", f"model_path={stage / 'export'}", "max_new_tokens=8", cwd=tmp_path)
    out = json.loads((stage / "eval_test.json").read_text())
    assert out["data"]["file"] == str(chat_file) and out["data"]["num_examples"] == 12
    assert out["metric"] == "answer_match(last_number)" and out["style"] == "fast"
    assert out["run"]["stage"] == "01_sft_fast"

    # other data, named: its own file, the earlier result left as it was
    run_cli("kdpipe-eval", f"model_path={stage / 'export'}", "data=arith", "limit=5", "max_new_tokens=8", cwd=tmp_path)
    other = [p.name for p in stage.glob("eval_test-arith-*.json")]
    assert len(other) == 1 and json.loads((stage / "eval_test.json").read_text()) == out


def test_kdpipe_eval_scores_external_predictions(tmp_path, chat_file):
    records = third_party_chat(12)
    predictions = write_records(
        tmp_path / "replies.jsonl", [{"id": r["id"], "response": r["messages"][-1]["content"]} for r in records]
    )
    run_cli("kdpipe-eval", f"predictions={predictions}", *chat_data_overrides(chat_file), cwd=tmp_path)
    out = json.loads((tmp_path / "replies.eval_test.json").read_text())
    assert out["metrics"]["accuracy"] == 1.0 and out["metrics"]["num_examples"] == 12
    assert out["predictions"] == str(predictions) and out["data"]["fingerprint"]

    def scored(path, *overrides):  # the same command in this process (each subprocess costs ~10 s of imports)
        return evaluate(compose_cfg([f"predictions={path}", *overrides], config_name="eval"))

    wrong = write_records(tmp_path / "wrong.jsonl", [{"id": r["id"], "response": "The answer is -1."} for r in records])
    assert scored(wrong, *chat_data_overrides(chat_file))["metrics"]["accuracy"] == 0.0
    # bad input: one line naming the file and line
    bad = write_records(tmp_path / "bad.jsonl", [{"id": "q0", "response": "x"}, "{oops"])
    with pytest.raises(DataError, match=f"{bad}:2:2: invalid JSON"):
        scored(bad, *chat_data_overrides(chat_file))
    unknown = write_records(tmp_path / "unknown.jsonl", [{"id": "zz", "response": "x"}])
    with pytest.raises(DataError, match=r"ids are not in data\.files\.test"):
        scored(unknown, *chat_data_overrides(chat_file))
    with pytest.raises(ValueError, match="name the data"):
        scored(predictions)


def test_a_metric_without_references_is_refused_before_training_and_loss_still_applies(tiny_cfg, tmp_path):
    plain = write_records(tmp_path / "plain.jsonl", third_party_chat(8, numeric=False))
    base = [*chat_data_overrides(plain), "pipeline.order=[sft_fast]"]
    with pytest.raises(PipelineConfigError, match=r"stage 'sft_fast': eval.metric=answer_match\(boxed\) has nothing"):
        train(tiny_cfg(*base, "eval.metric=answer_match", "eval.extractor=boxed"))
    assert not (tmp_path / "run" / "01_sft_fast").exists()  # nothing trained
    run = train(tiny_cfg(*base))  # auto: no numbers in the references -> the loss only, said so
    metrics = run.result("sft_fast").metrics
    assert metrics["metric"] == "loss" and "accuracy" not in metrics and metrics["perplexity"] > 1
    assert not (tmp_path / "run" / "01_sft_fast" / "generations.jsonl").exists()
    table = (tmp_path / "run" / "results.md").read_text()
    assert "n/a: loss only" in table and "| loss |" in table.replace("  ", " ")


def test_a_stage_evaluates_with_lm_eval_on_a_local_task(tiny_cfg, tmp_path):
    pytest.importorskip("lm_eval")
    from tests.unit.eval.test_lm_eval_backend import TASK_YAML

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = write_records(tasks / "tiny_local.jsonl", [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(3)])
    (tasks / "tiny_local.yaml").write_text(TASK_YAML.format(data=data, max_gen_toks=6))
    run = train(
        tiny_cfg(
            "pipeline.order=[sft_fast]",
            "eval.backend=lm_eval",
            "eval.tasks=[tiny_local]",
            f"eval.include_path={tasks}",
        )
    )
    metrics = run.result("sft_fast").metrics
    assert metrics["metric"] == "lm_eval" and 0.0 <= metrics["lm_eval/tiny_local/exact_match"] <= 1.0
    assert (tmp_path / "run" / "01_sft_fast" / "lm_eval" / "lm_eval_results.json").exists()
