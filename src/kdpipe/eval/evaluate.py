"""Evaluate a model on a split: generation accuracy, response length and teacher-forced loss."""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpipe.data.collate import Collator
from kdpipe.data.encode import encode_example, prompt_messages
from kdpipe.eval.generate import generate_responses
from kdpipe.eval.metrics import is_correct, summarize
from kdpipe.losses import token_cross_entropy


@torch.no_grad()
def label_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    style: str,
    batch_size: int,
    system_prompt: str | None = None,
) -> float | None:
    """Mean cross-entropy per label token of the ``style`` responses (None if no example has one)."""
    encoded = [
        encode_example(tokenizer, ex, style, system_prompt=system_prompt)
        for ex in examples
        if style in ex.get("responses", {}) or "messages" in ex  # chat records carry their own assistant turns
    ]
    if not encoded:
        return None
    collate = Collator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size])
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        labels = batch["labels"].to(device)
        total += float(token_cross_entropy(logits, labels, reduction="sum"))
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    *,
    style: str | None = None,
    system_prompt: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    description: str = "evaluating",
    show_progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Greedy-generate an answer for every example and score it.

    ``system_prompt`` asks for a response style (e.g. the ``fast`` style's guidance); ``style`` names the
    reference responses the teacher-forced ``loss`` is computed on. Returns the metrics (``accuracy``,
    ``accuracy_by_level``, ``mean_response_tokens``, ``loss`` on the ``style`` responses when given, ...)
    and one record per example (id, level, response, correct).
    """
    started = time.perf_counter()
    generations = generate_responses(
        model,
        tokenizer,
        [prompt_messages(ex, system_prompt) for ex in examples],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        show_progress=show_progress,
        description=description,
    )
    metrics = summarize(examples, generations)
    if style is not None:
        metrics["loss"] = label_loss(model, tokenizer, examples, style, batch_size, system_prompt)
        metrics["eval_style"] = style
    metrics["eval_seconds"] = time.perf_counter() - started
    records = [
        {
            "id": ex["id"],
            "level": ex.get("level"),
            "prompt": ex.get("prompt"),
            "answer": ex.get("answer"),
            "response": g.text,
            "num_tokens": g.num_tokens,
            "correct": is_correct(ex, g.text),
        }
        for ex, g in zip(examples, generations)
    ]
    return metrics, records
