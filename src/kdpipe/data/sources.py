"""Where examples come from. Every source yields the same example dicts (see :mod:`kdpipe.data.arith`).

Sources are named by ``data.source``: ``arith`` (the built-in task) today; file and Hugging Face dataset
sources plug in here under their own names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import lru_cache

from omegaconf import DictConfig

from kdpipe.data import arith


@lru_cache(maxsize=16)
def _arith_split(split: str, n_per_level: int, seed: int, levels: tuple[int, ...], max_value: int) -> tuple:
    return tuple(arith.generate_split(split, n_per_level, seed=seed, levels=list(levels), max_value=max_value))


def load_arith(cfg: DictConfig, split: str) -> list[dict]:
    """The built-in arithmetic task; sizes per level come from ``cfg.n_<split>_per_level``."""
    key = f"n_{split}_per_level"
    if key not in cfg:
        raise KeyError(f"data config has no {key!r}")
    examples = _arith_split(split, int(cfg[key]), int(cfg.seed), tuple(cfg.levels), int(cfg.max_value))
    return [dict(e) for e in examples]  # shallow copies: callers may annotate them


SOURCES: dict[str, Callable[[DictConfig, str], list[dict]]] = {"arith": load_arith}


def load_examples(cfg: DictConfig, split: str) -> list[dict]:
    """Load one split of the dataset described by a ``data`` config."""
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data.source {cfg.source!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[cfg.source](cfg, split)


def subset_by_id(examples: list[dict], fraction: float) -> list[dict]:
    """The examples whose id hashes below ``fraction``: about that share, the same for every run, and
    nested (a smaller fraction's subset lies inside a larger one's), so data-scale studies compare like
    with like."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return examples
    threshold = int(fraction * 2**32)
    return [e for e in examples if int(hashlib.sha1(str(e["id"]).encode()).hexdigest()[:8], 16) < threshold]
