"""Difficulty scorers for the curriculum: one number per example, higher is harder.

- ``level``: the example's given difficulty level;
- ``length``: its number of response (label) tokens;
- ``teacher_nll``: the teacher's mean negative log-likelihood of the label tokens, read from the teacher store
  (free once the teacher is scored);
- ``teacher_entropy``: the teacher's mean entropy over its top-k + tail bins, also from the store;
- ``student_loss``: the current model's mean label NLL, from one scoring pass at stage start;
- ``composite``: a weighted average of the normalised ranks of several scorers (``components``).

A scorer config is a mapping with a ``name`` and its options (``configs/curriculum/scorer/<name>.yaml``);
a bare name is accepted as shorthand. Store-based scores are cached per store and scorer in
``<store>/scores/<scorer>.json``, student losses per stage in ``<stage>/scores/student_loss.json`` (by example
id), so a resumed stage orders its data exactly as the interrupted one did.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress

from kdpipe.types import IGNORE_INDEX, EncodedExample
from kdpipe.utils.dist import is_rank_zero
from kdpipe.utils.io import atomic_write_json

STORE_SCORERS = ("teacher_nll", "teacher_entropy")
MODEL_SCORERS = ("student_loss",)
SCORERS = ("level", "length", *STORE_SCORERS, *MODEL_SCORERS, "composite")


def scorer_config(curriculum: Mapping) -> dict:
    """The curriculum's scorer as a plain ``{"name": ..., **options}`` dict (a bare name is shorthand)."""
    scorer = curriculum.get("scorer", "level")
    if isinstance(scorer, str):
        return {"name": scorer}
    scorer = dict(scorer)
    if "name" not in scorer:
        raise ValueError(f"curriculum.scorer needs a `name` (one of {list(SCORERS)}); got keys {sorted(scorer)}")
    return scorer


def _component_names(scorer: dict) -> list[str]:
    if scorer["name"] == "composite":
        return [str(name) for name in (scorer.get("components") or {})]
    return [scorer["name"]]


def needs_store(curriculum: Mapping) -> bool:
    """Whether a curriculum config's scorer reads the teacher store."""
    return any(name in STORE_SCORERS for name in _component_names(scorer_config(curriculum)))


def needs_model(curriculum: Mapping) -> bool:
    """Whether a curriculum config's scorer runs the current model over the data (``student_loss``)."""
    return any(name in MODEL_SCORERS for name in _component_names(scorer_config(curriculum)))


def _teacher_stats(rows, name: str) -> float:
    if name == "teacher_nll":
        return float(-rows.label_logprob.double().mean()) if rows.label_logprob.numel() else 0.0
    p = rows.topk_logprobs.double().exp()
    tail = rows.tail_logprob.double().exp()
    entropy = -(torch.xlogy(p, p).sum(-1) + torch.xlogy(tail, tail))
    return float(entropy.mean()) if entropy.numel() else 0.0


def store_scores(store, examples: list[EncodedExample], name: str) -> list[float]:
    """``teacher_nll`` or ``teacher_entropy`` per example, cached beside the store."""
    cache_path = store.path / "scores" / f"{name}.json"
    cache: dict[str, float] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    missing = [e.id for e in examples if e.id not in cache]
    for example_id in missing:
        cache[example_id] = _teacher_stats(store.get(example_id), name)
    if missing and is_rank_zero():  # under DDP every rank computes the same scores; one writes them
        with contextlib.suppress(OSError):  # a read-only store still works, only uncached
            atomic_write_json(cache_path, cache)
    return [cache[e.id] for e in examples]


@torch.no_grad()
def model_losses(
    model: torch.nn.Module,
    examples: list[EncodedExample],
    collate: Callable[[list[EncodedExample]], dict],
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[float]:
    """Mean NLL of each example's label tokens under ``model`` (eval mode, float32 log-softmax)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses: list[float] = []
    try:
        with Progress(transient=True, disable=not show_progress) as progress:
            task = progress.add_task("scoring difficulty (student_loss)", total=len(examples))
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = collate(chunk)
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
                logits = model(**inputs, use_cache=False).logits.float()
                labels = batch["labels"].to(device)
                nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
                counts = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
                losses.extend((nll.double().sum(-1) / counts).tolist())
                progress.advance(task, len(chunk))
    finally:
        model.train(was_training)
    return losses


def _broadcast_from_rank0(values: dict[str, float]) -> dict[str, float]:
    """Under torch.distributed every rank must order the data identically: rank 0's scores win."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [values]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return values


def student_loss_scores(
    examples: list[EncodedExample],
    model: torch.nn.Module | None,
    collate: Callable | None,
    cache_dir: str | Path | None,
    batch_size: int = 64,
) -> list[float]:
    """``student_loss`` per example, computed once per stage and cached in ``<cache_dir>/student_loss.json``.

    The cache is what makes resume exact: a resumed stage's model has already trained, so its losses would
    order the data differently; the stage-start scores are read back instead.
    """
    cache_path = Path(cache_dir) / "student_loss.json" if cache_dir is not None else None
    cache: dict[str, float] = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    missing = [e for e in examples if e.id not in cache]
    if missing:
        if model is None or collate is None:
            raise ValueError("curriculum.scorer=student_loss runs the current model: no model was given")
        cache.update(zip((e.id for e in missing), model_losses(model, missing, collate, batch_size)))
        cache = _broadcast_from_rank0(cache)
        if cache_path is not None and is_rank_zero():
            atomic_write_json(cache_path, cache)
    return [cache[e.id] for e in examples]


def _ranks(values: list[float]) -> list[float]:
    """Normalised average ranks in [0, 1] (ties share their mean rank)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for idx in order[i : j + 1]:
            ranks[idx] = (i + j) / 2
        i = j + 1
    top = max(len(values) - 1, 1)
    return [r / top for r in ranks]


def example_scores(
    examples: list[EncodedExample],
    cfg: Mapping,
    store=None,
    *,
    model: torch.nn.Module | None = None,
    collate: Callable | None = None,
    cache_dir: str | Path | None = None,
) -> list[float]:
    """Difficulty of every example under the curriculum config's ``scorer``.

    Args:
        examples: the encoded training examples.
        cfg: the ``curriculum`` config (its ``scorer``: a name or ``{name, ...options}``).
        store: the teacher store that ``teacher_nll`` / ``teacher_entropy`` read.
        model, collate: the current model and a batch collator, for ``student_loss``.
        cache_dir: where ``student_loss`` scores are cached (the stage's ``scores/`` folder).
    """
    scorer = scorer_config(cfg)
    name = scorer["name"]
    if name == "level":
        missing = [e.id for e in examples if e.level is None]
        if missing:
            raise ValueError(f"examples have no level (e.g. {missing[:3]}); use curriculum.scorer=length")
        return [float(e.level) for e in examples]
    if name == "length":
        return [float(e.num_label_tokens) for e in examples]
    if name in STORE_SCORERS:
        if store is None:
            raise ValueError(f"curriculum.scorer={name} reads the teacher store: score the teacher first")
        return store_scores(store, examples, name)
    if name == "student_loss":
        batch_size = int(scorer.get("batch_size") or 64)
        return student_loss_scores(examples, model, collate, cache_dir, batch_size)
    if name == "composite":
        components = dict(scorer.get("components") or {})
        if not components or "composite" in components:
            raise ValueError(
                "curriculum.scorer.components must map other scorers to weights, e.g. {level: 1.0, length: 1.0}"
            )
        total = sum(float(w) for w in components.values())
        if total <= 0:
            raise ValueError(f"curriculum.scorer.components weights must sum to > 0; got {components}")
        combined = [0.0] * len(examples)
        for component, weight in components.items():
            sub = {"scorer": {**scorer, "name": component}}
            ranks = _ranks(example_scores(examples, sub, store, model=model, collate=collate, cache_dir=cache_dir))
            combined = [c + float(weight) / total * r for c, r in zip(combined, ranks)]
        return combined
    raise ValueError(f"unknown curriculum.scorer {name!r}; choose one of {list(SCORERS)}")
