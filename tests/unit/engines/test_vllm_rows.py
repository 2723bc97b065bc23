"""The vLLM engine's pure parts, without vLLM (its end-to-end tests run in .venv-vllm: tests/vllm_engine/): store rows
from vLLM's prompt log-probs against the Hugging Face scorer's on the same distribution (float64), the
preflight's refusals, and what a checkpoint's fingerprint covers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kdpipe.engines.vllm_engine import checkpoint_fingerprint, head_size, model_problem, rows_from_prompt_logprobs
from kdpipe.errors import PipelineConfigError
from kdpipe.modules.scorer import topk_signal
from kdpipe.types import IGNORE_INDEX
from tests.helpers import encoded, tiny_llama


@dataclass
class Logprob:  # the fields of vllm.logprobs.Logprob that kdpipe reads
    logprob: float
    rank: int | None


def vllm_prompt_logprobs(logprobs: torch.Tensor, ids: list[int], k: int) -> list:
    """What vLLM returns for a prompt: None for the first token, then at token t the top k of row t - 1 and,
    if it is not among them, token t itself (with its rank)."""
    out = [None]
    for t in range(1, len(ids)):
        row = logprobs[t - 1]
        order = torch.argsort(row, descending=True).tolist()
        entry = {tok: Logprob(float(row[tok]), rank + 1) for rank, tok in enumerate(order[:k])}
        if ids[t] not in entry:
            entry[ids[t]] = Logprob(float(row[ids[t]]), order.index(ids[t]) + 1)
        out.append(entry)
    return out


def test_rows_from_prompt_logprobs_equal_the_hf_scorers_on_the_same_distribution(tokenizer):
    model, k = tiny_llama(tokenizer).double(), 5
    for example in encoded(tokenizer, n_per_level=1, style="fast"):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([example.input_ids])).logits[0], dim=-1)
        rows = rows_from_prompt_logprobs(example, vllm_prompt_logprobs(logprobs, example.input_ids, k), k)
        mask = torch.tensor(example.labels) != IGNORE_INDEX
        labels = torch.tensor(example.labels)[mask]
        ids, _, _, _ = topk_signal(logprobs[mask], labels, k)  # the HF path's ids
        lps, order = logprobs[mask].topk(k, dim=-1)  # the float64 reference of the values
        tail = torch.logsumexp(logprobs[mask].scatter(-1, order, float("-inf")), dim=-1)
        label_lp = logprobs[mask].gather(-1, labels[:, None])[:, 0]
        assert torch.equal(rows["topk_ids"], ids) and torch.equal(ids, order)
        torch.testing.assert_close(rows["topk_logprobs"].double(), lps, atol=1e-6, rtol=0)  # float32 rows
        torch.testing.assert_close(rows["tail_logprob"].double(), tail, atol=1e-5, rtol=0)
        torch.testing.assert_close(rows["label_logprob"].double(), label_lp, atol=1e-6, rtol=0)


def test_a_position_without_its_label_or_with_fewer_than_k_entries_is_an_error(tokenizer):
    example = encoded(tokenizer, n_per_level=1, style="fast")[0]
    logprobs = torch.log_softmax(torch.randn(len(example.input_ids), len(tokenizer), dtype=torch.float64), -1)
    given = vllm_prompt_logprobs(logprobs, example.input_ids, 4)
    first = next(t for t, label in enumerate(example.labels) if label != IGNORE_INDEX) + 1
    given[first] = {tok: lp for tok, lp in given[first].items() if tok != example.input_ids[first]}
    with pytest.raises(RuntimeError, match="no log-prob for the label token"):
        rows_from_prompt_logprobs(example, given, 3)
    with pytest.raises(RuntimeError, match="returned 4 log-probs at a position, k=6"):
        rows_from_prompt_logprobs(example, vllm_prompt_logprobs(logprobs, example.input_ids, 4), 6)


def test_a_full_vocabulary_leaves_no_tail():
    from kdpipe.types import EncodedExample

    example = EncodedExample(id="x", input_ids=[0, 1], labels=[1, IGNORE_INDEX])
    half = math.log(0.5)
    rows = rows_from_prompt_logprobs(example, [None, {0: Logprob(half, 1), 1: Logprob(half, 2)}], 2)
    assert rows["tail_logprob"].item() == float("-inf") and rows["label_logprob"].item() == pytest.approx(half)


def test_head_sizes_and_the_checkpoint_fingerprint(tmp_path, tokenizer):
    assert head_size({"hidden_size": 192, "num_attention_heads": 3}) == 64
    assert head_size({"hidden_size": 96, "num_attention_heads": 2, "head_dim": 32}) == 32
    tiny_llama(tokenizer, hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path / "m")  # head size 16
    assert "head size 16" in model_problem(tmp_path / "m") and "no config.json" in model_problem(tmp_path)
    before = checkpoint_fingerprint(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("notes")  # not a weight file: same fingerprint
    assert checkpoint_fingerprint(tmp_path / "m") == before
    tiny_llama(tokenizer, seed=1, hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path / "m")
    assert checkpoint_fingerprint(tmp_path / "m")["weights_sha256"] != before["weights_sha256"]


def test_the_preflight_refuses_vllm_when_missing_at_another_temperature_and_at_a_cpu_head_size(tiny_cfg, tmp_path):
    from kdpipe.cli.train import train
    from kdpipe.engines import vllm_engine

    if vllm_engine.vllm_available():
        pytest.skip("vLLM is installed here: the missing-vLLM refusal is checked in the default environment")
    overrides = ["pipeline.order=[teacher_sft,score]", "pipeline.stages.score.engine=vllm",
                 "pipeline.stages.score.temperature=2.0"]  # fmt: skip
    with pytest.raises(PipelineConfigError) as caught:
        train(tiny_cfg(*overrides))
    message = str(caught.value)
    assert "vLLM is not installed" in message and "make venv-vllm" in message
    assert "temperature 1 only" in message
    if vllm_engine.on_cpu():
        assert "head size 16" in message  # arith_tiny: 32 / 2
    assert not (tmp_path / "run" / "01_teacher_sft" / "export").exists()
    with pytest.raises(PipelineConfigError, match=r"engine=onnx: choose one of \['hf', 'vllm'\]"):
        train(tiny_cfg("pipeline.order=[score]", "pipeline.stages.score.engine=onnx", run_dir=tmp_path / "other"))
