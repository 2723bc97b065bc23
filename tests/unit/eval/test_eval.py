"""Evaluation: batched KV-cache generation equals one-at-a-time greedy decoding; metrics on known cases."""

from __future__ import annotations

import torch

from kdpipe.data.arith import generate_split
from kdpipe.data.encode import prompt_messages
from kdpipe.eval.generate import Generation, generate_responses
from kdpipe.eval.metrics import AnswerMatch, score_replies, summarize
from tests.helpers import tiny_llama


def greedy_reference(model, tokenizer, messages, max_new_tokens):
    """Plain greedy decoding without batching, padding or KV cache: the reference."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = torch.tensor([ids["input_ids"]])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == tokenizer.eos_token_id:
                break
    return new


def test_batched_generation_matches_unbatched_greedy(tokenizer):
    model = tiny_llama(tokenizer, seed=3)
    examples = generate_split("test", 2, seed=0)  # prompts of different lengths: left padding matters
    convs = [prompt_messages(e) for e in examples]
    out = generate_responses(model, tokenizer, convs, batch_size=4, max_new_tokens=12, show_progress=False)
    for conv, gen in zip(convs, out):
        ref = greedy_reference(model, tokenizer, conv, 12)
        assert gen.num_tokens == len(ref)
        assert gen.text == tokenizer.decode(ref, skip_special_tokens=True)
    assert tokenizer.padding_side == "right"  # restored


def test_summarize_counts_accuracy_per_level_and_length():
    examples = [
        {"id": "a", "level": 1, "answer": "3"},
        {"id": "b", "level": 1, "answer": "4"},
        {"id": "c", "level": 2, "answer": "10"},
    ]
    gens = [
        Generation("1+2=3\nAnswer: 3", 10, True),
        Generation("Answer: 5", 4, True),
        Generation("Answer: 1", 6, False),
    ]
    metric = AnswerMatch("answer_colon")
    m = summarize(metric, examples, score_replies(metric, examples, [g.text for g in gens]), gens)
    assert m["metric"] == "answer_match(answer_colon)" and m["coverage"] == 1.0
    assert m["accuracy"] == 1 / 3
    assert m["accuracy_by_level"] == {"1": 0.5, "2": 0.0}
    assert m["mean_response_tokens"] == 20 / 3
    assert m["truncated_fraction"] == 1 / 3
