"""Evaluate a model on a split: its replies scored by a metric, response length, teacher-forced loss."""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpipe.data.collate import Collator
from kdpipe.data.encode import encode_example, prompt_messages, reference_reply
from kdpipe.eval.generate import generate_responses
from kdpipe.eval.metrics import Metric, perplexity, records, score_replies, summarize
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
        # chat records carry their own assistant turns; a prompt-only record has nothing to score
        if style in ex.get("responses", {}) or ("messages" in ex and not ex.get("unlabelled"))
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


def with_references(examples: list[dict], style: str | None) -> list[dict]:
    """The examples, each with its ``reference`` reply for ``style`` (what the metrics compare with)."""
    return [{**ex, "reference": reference_reply(ex, style)} for ex in examples]


def score_predictions(metric: Metric, examples: list[dict], replies: list[str]) -> tuple[dict, list[dict]]:
    """Score replies produced elsewhere (``kdpipe-eval predictions=``) as :func:`evaluate_model` scores its own;
    ``examples`` carry their ``reference`` (:func:`with_references`)."""
    scored = score_replies(metric, examples, replies)
    summary = summarize(metric, examples, scored)
    summary["mean_response_chars"] = sum(len(r) for r in replies) / len(replies) if replies else None
    return summary, records(examples, replies, scored)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    *,
    metric: Metric,
    style: str | None = None,
    system_prompt: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    description: str = "evaluating",
    show_progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Greedy-generate a reply for every example and score it with ``metric``; the teacher-forced loss.

    ``system_prompt`` asks for a response style (e.g. the ``fast`` style's guidance); ``style`` names the
    reference replies the metric compares with and the ``loss`` is computed on. A metric that does not
    generate (``loss``) skips generation. Returns the metrics (``metric``, ``accuracy``, ``accuracy_by_level``,
    ``coverage``, ``mean_response_tokens``, ``loss``, ``perplexity``, ...) and one record per example.
    """
    started = time.perf_counter()
    examples = with_references(examples, style)
    metrics, rows = {"metric": metric.name, "num_examples": len(examples)}, []
    if metric.generates:
        generations = generate_responses(
            model,
            tokenizer,
            [prompt_messages(ex, system_prompt) for ex in examples],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            show_progress=show_progress,
            description=description,
        )
        replies = [g.text for g in generations]
        scored = score_replies(metric, examples, replies)
        metrics = summarize(metric, examples, scored, generations)
        rows = records(examples, replies, scored, generations)
    if style is not None:
        metrics["loss"] = label_loss(model, tokenizer, examples, style, batch_size, system_prompt)
        metrics["perplexity"] = perplexity(metrics["loss"])
        metrics["eval_style"] = style
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics, rows
