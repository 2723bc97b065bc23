"""The lm-eval backend: a local generate_until task on a tiny export scores what greedy decoding predicts."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from kdpipe.eval.lm_eval_backend import MISSING, OFFLINE_ENV, _flat_metrics, run_lm_eval
from tests.helpers import tiny_llama

MAX_GEN_TOKS = 8
TASK_YAML = """\
task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def greedy_reply(model, tokenizer, question: str) -> str:
    """What the harness should predict: the chat prompt's greedy continuation, up to the task's stop string."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)  # fmt: skip
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]


def test_local_task_scores_the_greedy_replies(tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    model = tiny_llama(tokenizer, seed=0)
    export = tmp_path / "export"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    # documents 0 and 3 expect the model's own greedy reply, 1 and 2 an answer it can never give (it holds the
    # stop string); limit=3 leaves document 3 out, so exact_match is 1/3 exactly (2/4 if the limit were ignored)
    questions = ["1+1=", "2+3=", "7-4=", "9*9="]
    answers = [greedy_reply(model, tokenizer, questions[0]), "no\nmatch", "no\nmatch"]
    answers.append(greedy_reply(model, tokenizer, questions[3]))
    data = tmp_path / "tasks" / "tiny_local.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(questions, answers)))
    (data.parent / "tiny_local.yaml").write_text(TASK_YAML.format(data=data, max_gen_toks=MAX_GEN_TOKS))
    env_before = {name: os.environ.get(name) for name in OFFLINE_ENV}

    metrics = run_lm_eval(export, ["tiny_local"], include_path=data.parent, limit=3,
                          batch_size=2, output_dir=tmp_path / "out")  # fmt: skip

    assert set(metrics) >= {"lm_eval/tiny_local/exact_match", "lm_eval/tiny_local/exact_match_stderr"}
    score = metrics["lm_eval/tiny_local/exact_match"]
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert score == pytest.approx(1 / 3)
    assert {name: os.environ.get(name) for name in OFFLINE_ENV} == env_before  # offline only for the call
    results = json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())
    assert results["results"]["tiny_local"]["exact_match,none"] == pytest.approx(1 / 3)
    (sample, *_) = json.loads((tmp_path / "out" / "lm_eval_samples.json").read_text())["tiny_local"]
    context = sample["arguments"][0][0]  # the request's (context, generation kwargs)
    assert context.startswith("<|im_start|>user\n") and context.endswith("<|im_start|>assistant\n")  # chat template


def test_flat_metrics_names_and_drops():
    results = {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
        "mine": {"name": "mine", "sample_len": 3, "acc,none": 1, "acc_stderr,none": "N/A", "f1,none": float("nan")},
    }
    assert _flat_metrics(results) == {
        "lm_eval/gsm8k/exact_match/strict-match": 0.25,
        "lm_eval/gsm8k/exact_match_stderr/strict-match": 0.1,
        "lm_eval/mine/acc": 1.0,
    }


def test_missing_lm_eval_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'kdpipe\[eval\]'") as err:
        run_lm_eval(tmp_path, ["any"])
    assert str(err.value) == MISSING
