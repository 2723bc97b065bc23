"""``KDLossSettings``: what a distillation loss is, in one validated object taken by every loss function.

A stage's ``loss:`` config becomes one with ``KDLossSettings(**cfg)``; bad values fail there, each error naming
its key. The tensors of a call (``has_teacher``, the LM head's bias) and how the fused loss runs (``chunk_size``,
``backend``) are not settings: they are arguments of the functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Real
from typing import Any

from kdpipe.types import IGNORE_INDEX

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
TAIL_MODES = ("bucket", "renormalize", "ignore")
NORMALIZE_MODES = ("token", "sequence")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class KDLossSettings:
    """The loss ``ce_weight * CE + (1 - ce_weight) * divergence`` (see :mod:`kdpipe.losses.kd`).

    Attributes:
        divergence: one of ``DIVERGENCES``.
        beta: the JSD mixture weight or the skew, in [0, 1].
        temperature: divides the student logits for the divergence (not for CE); > 0.
        ce_weight: the CE share of the loss, in [0, 1] (1: plain cross-entropy, no teacher needed).
        tail: how the teacher's tail is scored, one of ``TAIL_MODES``.
        normalize: ``token`` (mean over the batch's positions) or ``sequence`` (per sequence, then over them).
        scale_by_t2: multiply the divergence by ``temperature ** 2``.
        ignore_index: the label of positions that carry no loss.
    """

    divergence: str = "fkl"
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    tail: str = "bucket"
    normalize: str = "token"
    scale_by_t2: bool = True
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("tail", self.tail, TAIL_MODES)
        _choice("normalize", self.normalize, NORMALIZE_MODES)
        for name in ("beta", "temperature", "ce_weight"):  # config numbers may come as ints: stored as floats
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if not isinstance(self.scale_by_t2, bool):
            raise ValueError(f"scale_by_t2 must be true or false, got {self.scale_by_t2!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an integer, got {self.ignore_index!r}")

    def replace(self, **changes: Any) -> KDLossSettings:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes) if changes else self


PLAIN_CE = KDLossSettings(ce_weight=1.0)  # plain token cross-entropy on the labels (SFT): no teacher needed


def resolve(settings: KDLossSettings | None, overrides: dict[str, Any]) -> KDLossSettings:
    """``settings`` (default: ``KDLossSettings()``) with keyword ``overrides`` applied: the loss functions' way
    of still taking the settings' fields as keywords (``ce_weight=1.0``), validated like the object itself."""
    if settings is None:
        return KDLossSettings(**overrides)
    if not isinstance(settings, KDLossSettings):
        raise TypeError(f"settings must be a KDLossSettings, got {type(settings).__name__}")
    return settings.replace(**overrides)
