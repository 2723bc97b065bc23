"""Sampling a rollout set (:mod:`kdpipe.data.rollouts`: the format) with the model's own ``generate`` or with
vLLM (a :class:`~kdpipe.engines.vllm_engine.VllmEngine` as the model).

Sampling is seeded per part (vLLM: per request), so a resumed rollout samples the parts an uninterrupted one
would write: exactly on the Hugging Face path; on vLLM up to its batch-shape non-determinism, which is why a
resumed set keeps its complete parts as they are and the manifest lists them (``resumed_parts``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpipe.data.encode import prompt_messages, reference_reply
from kdpipe.data.rollouts import (
    MANIFEST,
    ROLLOUT_VERSION,
    RolloutSettings,
    apply_filters,
    part_path,
    read_part,
    rollout_id,
)
from kdpipe.engines.vllm_engine import VllmEngine, sample_part_vllm
from kdpipe.eval.generate import generate_responses
from kdpipe.eval.metrics import AnswerMatch, Metric
from kdpipe.utils.io import atomic_write_json, atomic_write_text, read_json


def sample_part(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[dict],
    settings: RolloutSettings,
    part_index: int,
    system_prompt: str | None,
    metric: Metric | None = None,
) -> list[dict]:
    """The records of one part: ``n_samples`` responses to each prompt, sampled with the part's seed;
    ``correct`` as ``metric`` scores them (default: the built-in task's ``Answer: N``; None: no reference)."""
    metric = metric or AnswerMatch("answer_colon")
    if isinstance(model, VllmEngine):  # one request per prompt with n samples, each request seeded
        conversations = [prompt_messages(ex, system_prompt) for ex in prompts]
        per_prompt = sample_part_vllm(model.llm, tokenizer, conversations, settings, part_index)
        generations = [g for samples in per_prompt for g in samples]  # prompt-major, as below
    else:
        conversations = [prompt_messages(ex, system_prompt) for ex in prompts for _ in range(settings.n_samples)]
        torch.manual_seed(settings.seed * 1_000_003 + part_index)  # per part: a resumed part samples the same
        greedy = settings.temperature == 0
        generations = generate_responses(
            model,
            tokenizer,
            conversations,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
            do_sample=not greedy,
            temperature=settings.temperature if not greedy else 1.0,
            top_p=settings.top_p,
            description=f"rollout part {part_index}",
        )
    records = []
    for i, generation in enumerate(generations):
        prompt, sample = prompts[i // settings.n_samples], i % settings.n_samples
        record = {k: v for k, v in prompt.items() if k not in ("id", "responses", "unlabelled")}
        record.update(
            id=rollout_id(prompt["id"], sample),
            prompt_id=prompt["id"],
            sample=sample,
            responses={settings.style: generation.text},
            num_tokens=generation.num_tokens,
            finished=generation.finished,
            correct=_correct(metric, generation.text, prompt, settings.style),
        )
        records.append(record)
    return records


def _correct(metric: Metric, text: str, prompt: dict, style: str) -> bool | None:
    score = metric(text, {**prompt, "reference": reference_reply(prompt, style)})
    return None if score is None else score >= 1.0


def write_rollouts(
    root: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[dict],
    settings: RolloutSettings,
    system_prompt: str | None = None,
    info: dict | None = None,
    metric: Metric | None = None,
) -> dict:
    """Sample every part not yet on disk, then write the manifest; returns the manifest.

    An existing complete set (manifest present) is left as it is; so are the parts an interrupted call
    already wrote. ``info`` (e.g. the student's fingerprint) is recorded in the manifest.
    """
    root.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST).exists():
        return read_json(root / MANIFEST)
    num_parts = -(-len(prompts) // settings.part_size)
    kept = [index for index in range(num_parts) if part_path(root, index).exists()]  # from an interrupted run
    for index in range(num_parts):
        path = part_path(root, index)
        if path.exists():
            continue
        chunk = prompts[index * settings.part_size : (index + 1) * settings.part_size]
        records = sample_part(model, tokenizer, chunk, settings, index, system_prompt, metric)
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    records = [r for index in range(num_parts) for r in read_part(part_path(root, index))]
    manifest = {
        "version": ROLLOUT_VERSION,
        "settings": settings.__dict__,
        "parts": num_parts,
        "prompts": len(prompts),
        "samples": len(records),
        "truncated": sum(not r["finished"] for r in records),
        "incorrect": sum(r["correct"] is False for r in records),
        "kept": len(apply_filters(records, settings.drop_truncated, settings.only_correct)),
        # a resumed set: the parts an earlier, interrupted run wrote (kept as they are; the rest sampled now)
        "resumed_parts": kept,
        **(info or {}),
    }
    atomic_write_json(root / MANIFEST, manifest)
    return manifest
