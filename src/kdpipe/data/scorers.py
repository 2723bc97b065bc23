"""Difficulty scorers for the curriculum: one number per example, higher is harder.

- ``level``: the example's given difficulty level;
- ``length``: its number of response (label) tokens;
- ``teacher_nll``: the teacher's mean negative log-likelihood of the label tokens, read from the teacher store
  (free once the teacher is scored);
- ``teacher_entropy``: the teacher's mean entropy over its top-k + tail bins, also from the store;
- ``composite``: a weighted average of the normalised ranks of several scorers (``components``).

Store-based scores are cached per store and scorer in ``<store>/scores/<scorer>.json`` (by example id).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping

import torch

from kdpipe.data.encode import EncodedExample
from kdpipe.utils.io import atomic_write_json

STORE_SCORERS = ("teacher_nll", "teacher_entropy")
SCORERS = ("level", "length", *STORE_SCORERS, "composite")


def needs_store(cfg: Mapping) -> bool:
    """Whether a curriculum config's scorer reads the teacher store."""
    if cfg.get("scorer") == "composite":
        return any(name in STORE_SCORERS for name in (cfg.get("components") or {}))
    return cfg.get("scorer") in STORE_SCORERS


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
    if missing:
        with contextlib.suppress(OSError):  # a read-only store still works, only uncached
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


def example_scores(examples: list[EncodedExample], cfg: Mapping, store=None) -> list[float]:
    """Difficulty of every example under the curriculum config's ``scorer``."""
    name = cfg.get("scorer", "level")
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
    if name == "composite":
        components = dict(cfg.get("components") or {})
        if not components:
            raise ValueError("curriculum.scorer=composite needs curriculum.components: {scorer: weight, ...}")
        total = sum(float(w) for w in components.values())
        combined = [0.0] * len(examples)
        for component, weight in components.items():
            ranks = _ranks(example_scores(examples, {"scorer": component}, store))
            combined = [c + float(weight) / total * r for c, r in zip(combined, ranks)]
        return combined
    raise ValueError(f"unknown curriculum.scorer {name!r}; choose one of {list(SCORERS)}")
