"""Resolve and validate the stage order before any work starts.

``pipeline.stages`` is a library of named stages, ``pipeline.order`` the names to run (repeats allowed),
then ``pipeline.append`` (stages every order ends with, e.g. an experiment's common evaluations).
Each named stage is merged over the defaults of its kind (``stage_defaults.<kind>``, from
``configs/stage/<kind>.yaml``), and every key it sets must exist in those defaults, so a typo fails here,
naming the stage and the key, instead of being silently ignored halfway through a run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf


class PipelineConfigError(ValueError):
    """A pipeline config that cannot run; raised before any stage starts."""


@dataclass(frozen=True)
class StageSpec:
    """One entry of the order: its position, name, folder and fully merged settings."""

    index: int
    name: str
    config: DictConfig

    @property
    def kind(self) -> str:
        return str(self.config.kind)

    @property
    def model(self) -> str:
        return str(self.config.model)

    @property
    def dirname(self) -> str:
        return f"{self.index + 1:02d}_{self.name}"


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(spec: DictConfig, defaults: DictConfig, prefix: str) -> list[str]:
    """Keys set in ``spec`` that ``defaults`` does not have, recursing into nested sections."""
    bad = []
    for key in spec:
        if key not in defaults:
            bad.append(f"{prefix}{key}{_suggest(str(key), defaults.keys())}")
        elif isinstance(spec[key], DictConfig) and isinstance(defaults[key], DictConfig):
            if "_target_" in spec[key] and spec[key]._target_ != defaults[key].get("_target_"):
                continue  # a different class: its own keys
            bad.extend(_unknown_keys(spec[key], defaults[key], f"{prefix}{key}."))
    return bad


def resolve_stages(cfg: DictConfig, kinds: set[str]) -> list[StageSpec]:
    """The ordered, validated stages of ``cfg.pipeline``; raises :class:`PipelineConfigError`."""
    pipeline = cfg.get("pipeline")
    if pipeline is None or "stages" not in pipeline or "order" not in pipeline:
        raise PipelineConfigError("config needs pipeline.stages (named stages) and pipeline.order (names to run)")
    library = pipeline.stages
    order = list(pipeline.order) + list(pipeline.get("append") or [])  # append: run after any order/preset
    if not order:
        raise PipelineConfigError("pipeline.order is empty: name at least one stage from pipeline.stages")
    models = cfg.get("models") or {}
    specs = []
    for index, name in enumerate(order):
        if name not in library:
            raise PipelineConfigError(
                f"pipeline.order[{index}] names unknown stage {name!r}{_suggest(str(name), library.keys())}; "
                f"defined stages: {sorted(library.keys())}"
            )
        spec = library[name]
        kind = spec.get("kind")
        if kind not in kinds:
            raise PipelineConfigError(
                f"pipeline.stages.{name}.kind={kind!r} is not a stage kind{_suggest(str(kind), kinds)}; "
                f"kinds: {sorted(kinds)}"
            )
        defaults = cfg.stage_defaults.get(kind)
        if defaults is None:
            raise PipelineConfigError(f"no defaults for stage kind {kind!r}: add configs/stage/{kind}.yaml")
        unknown = _unknown_keys(spec, defaults, f"pipeline.stages.{name}.")
        if unknown:
            raise PipelineConfigError(f"unknown key(s) in stage {name!r}: {', '.join(unknown)}")
        # resolve against the whole config first: a stage may interpolate top-level keys (${data_fraction})
        own = OmegaConf.to_container(spec, resolve=True)
        merged = OmegaConf.merge(OmegaConf.to_container(defaults, resolve=True), own)
        if merged.model not in models:
            raise PipelineConfigError(
                f"pipeline.stages.{name}.model={merged.model!r} is not a configured model; "
                f"models: {sorted(models.keys())}"
            )
        specs.append(StageSpec(index=index, name=str(name), config=merged))
    return specs
