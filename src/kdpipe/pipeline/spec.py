"""Resolve and validate the stage order before any work starts.

``pipeline.stages`` is a library of named stages, ``pipeline.order`` the names to run (repeats allowed),
then ``pipeline.append`` (stages every order ends with, e.g. an experiment's common evaluations).

A pipeline file composes each named stage from its kind's defaults (``- /stage@stages.<name>: <kind>`` in its
defaults list, ``configs/stage/<kind>.yaml``), so every key exists at compose time and can be overridden or
swept from the command line. Here each stage is checked against those defaults: a key the kind does not have
fails, naming the stage and the key, instead of being silently ignored halfway through a run. A stage added
without its kind's defaults (``+pipeline.stages.x={kind: eval}``) gets them here.

A stage's ``optimizer``, ``scheduler`` and ``curriculum`` are the top-level groups of those names with the
stage's own keys changed (a different ``_target_`` replaces the group instead).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from kdpipe.errors import PipelineConfigError
from kdpipe.utils.paths import config_dir

GROUP_KEYS = ("optimizer", "scheduler", "curriculum")  # stage keys merged over the top-level group


@dataclass(frozen=True)
class StageSpec:
    """One entry of the order: its position, name, folder and fully merged settings; ``occurrence`` counts the
    entries of the same name up to this one (1 for the first: an order may repeat a stage)."""

    index: int
    name: str
    config: DictConfig
    occurrence: int = 1

    @property
    def instance(self) -> str:
        """The name of this entry among repeats: the stage's name, ``<name>#<n>`` for its n-th entry (n >= 2).
        Its seed derives from it, so the same entry sees the same seed in every order that holds it."""
        return self.name if self.occurrence == 1 else f"{self.name}#{self.occurrence}"

    @property
    def kind(self) -> str:
        return str(self.config.kind)

    @property
    def model(self) -> str:
        return str(self.config.model)

    @property
    def dirname(self) -> str:
        return f"{self.index + 1:02d}_{self.name}"


def stage_seed(run_seed: int, instance: str) -> int:
    """A stage's seed when it pins none: a 31-bit number hashed (sha256) from the run's seed and the stage
    entry's name (:attr:`StageSpec.instance`), not from its position, so a stage sees the same seed, and
    so the same data order, in every preset; stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256(f"kdpipe-stage-seed:{int(run_seed)}:{instance}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def stage_styles(settings: DictConfig) -> list[str]:
    """A stage's response styles (``style``: one name or a list)."""
    style = settings.get("style")
    return [str(style)] if isinstance(style, str) else [str(s) for s in (style or [])]


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def kind_defaults(cfg: DictConfig, kind: str) -> DictConfig:
    """The defaults of a stage kind: ``configs/stage/<kind>.yaml`` with its own defaults list (``kd`` extends
    ``sft``), unresolved. A run saved before stages were composed at compose time keeps its ``stage_defaults``."""
    if "stage_defaults" in cfg:  # a config.yaml written by kdpipe 0.1 (resumed)
        return cfg.stage_defaults[kind]
    raw = OmegaConf.load(Path(config_dir()) / "stage" / f"{kind}.yaml")
    entries = [str(e) for e in raw.pop("defaults", None) or []]
    merged = OmegaConf.create()
    for entry in entries if "_self_" in entries else [*entries, "_self_"]:  # as Hydra: _self_ last by default
        merged = OmegaConf.merge(merged, raw if entry == "_self_" else kind_defaults(cfg, entry))
    return merged


def _unknown_keys(spec: DictConfig, defaults: DictConfig, prefix: str, skip=()) -> list[str]:
    """Keys set in ``spec`` (but ``skip``) that ``defaults`` does not have, recursing into nested sections."""
    bad = []
    for key in spec:
        if key in skip:
            continue
        if key not in defaults:
            bad.append(f"{prefix}{key}{_suggest(str(key), defaults.keys())}")
        elif OmegaConf.is_interpolation(defaults, key):
            continue  # e.g. `metric: ${eval.metric}`: whatever the top-level key may hold
        elif isinstance(spec[key], DictConfig) and isinstance(defaults[key], DictConfig):
            if "_target_" in spec[key] and spec[key]._target_ != defaults[key].get("_target_"):
                continue  # a different class: its own keys
            bad.extend(_unknown_keys(spec[key], defaults[key], f"{prefix}{key}."))
    return bad


def _with_group(cfg: DictConfig, key: str, own):
    """A stage's ``optimizer`` / ``scheduler`` / ``curriculum``: the top-level group with the stage's keys changed.
    A different ``_target_`` is the stage's own class, whole; ``scheduler: null`` means no schedule."""
    group = cfg.get(key)
    group = OmegaConf.to_container(group, resolve=True) if isinstance(group, DictConfig) else group
    if own is None:
        return None if key == "scheduler" else group
    if not isinstance(group, dict) or ("_target_" in own and own["_target_"] != group.get("_target_")):
        return own
    return OmegaConf.to_container(OmegaConf.merge(group, own))


def complete_stages(cfg: DictConfig) -> None:
    """Give every library entry its kind's defaults (in place; a no-op for entries composed with them), so the
    saved ``config.yaml`` holds each stage whole."""
    library = OmegaConf.select(cfg, "pipeline.stages")
    if library is None:
        return
    with open_dict(cfg):
        for name in list(library.keys()):
            kind = library[name].get("kind")
            if kind is None or not (Path(config_dir()) / "stage" / f"{kind}.yaml").exists():
                continue  # resolve_stages names the problem
            if "stage_defaults" not in cfg:
                library[name] = OmegaConf.merge(kind_defaults(cfg, str(kind)), library[name])


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
    specs: list[StageSpec] = []
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
        defaults = kind_defaults(cfg, str(kind))
        legacy = "stage_defaults" in cfg
        own_keys = () if legacy else (*GROUP_KEYS, "data")  # checked against the top-level group below
        unknown = _unknown_keys(spec, defaults, f"pipeline.stages.{name}.", skip=own_keys)
        for key in ("optimizer", "scheduler", "data"):  # the group's keys, unless a _target_ replaces it
            if not legacy and isinstance(spec.get(key), DictConfig) and isinstance(cfg.get(key), DictConfig):
                unknown += _unknown_keys(spec[key], cfg[key], f"pipeline.stages.{name}.{key}.")
        if unknown:
            raise PipelineConfigError(f"unknown key(s) in stage {name!r}: {', '.join(unknown)}")
        # resolve against the whole config first: a stage may interpolate top-level keys (${data_fraction})
        merged = OmegaConf.to_container(spec, resolve=True)
        if legacy:  # kdpipe 0.1 configs: entries hold only what they change
            merged = OmegaConf.to_container(
                OmegaConf.merge(OmegaConf.to_container(defaults, resolve=True), merged), resolve=True
            )
        else:
            for key in GROUP_KEYS:
                if key in merged:
                    merged[key] = _with_group(cfg, key, merged[key])
        merged = OmegaConf.create(merged)
        if merged.model not in models:
            raise PipelineConfigError(
                f"pipeline.stages.{name}.model={merged.model!r} is not a configured model; "
                f"models: {sorted(models.keys())}"
            )
        if merged.get("control_of") is not None:
            merged = _as_control(cfg, str(name), merged, specs)
        occurrence = 1 + sum(s.name == str(name) for s in specs)
        specs.append(StageSpec(index=index, name=str(name), config=merged, occurrence=occurrence))
    return specs


def stage_data(cfg: DictConfig, settings: DictConfig) -> DictConfig:
    """The data config a stage reads: the top-level ``data`` with the stage's own ``data`` keys merged over it
    (e.g. a teacher trained on more, or cleaner, data than the student's: ``data: {n_train_per_level: 3000}``)."""
    own = settings.get("data")
    return OmegaConf.merge(cfg.data, own) if own else cfg.data


def _as_control(cfg: DictConfig, name: str, own: DictConfig, specs: Sequence[StageSpec]) -> DictConfig:
    """A budget-matched control (``control_of: <stage>``): an ``sft`` stage with the named stage's data,
    style, steps, batch, optimizer, schedule, curriculum, evaluation and seed (so the same data order), which
    starts from the weights that stage started from (:func:`control_target`). What the named stage adds
    beyond SFT (a ``kd`` stage's teacher signal, its on-policy share) is what the comparison isolates."""
    target = str(own.control_of)
    where = f"pipeline.stages.{name}.control_of={target!r}"
    if own.kind != "sft":
        raise PipelineConfigError(f"{where}: a control is an sft stage (kind: sft), not {own.kind!r}")
    earlier = [s for s in specs if s.name == target]
    if not earlier:
        raise PipelineConfigError(f"{where}: no stage of that name runs before it (the order so far: "
                                  f"{[s.name for s in specs]})")  # fmt: skip
    base = earlier[-1]
    if base.kind not in ("sft", "kd") or base.model != own.model or base.config.get("control_of") is not None:
        raise PipelineConfigError(
            f"{where}: the stage it controls must be an sft or kd stage of model {own.model!r} that is not a "
            f"control itself (it is a {base.kind} stage of {base.model!r})"
        )
    sft_keys = set(kind_defaults(cfg, "sft").keys())
    settings = {k: v for k, v in OmegaConf.to_container(base.config).items() if k in sft_keys}
    seed = base.config.get("seed")
    settings.update(
        kind="sft",
        control_of=target,
        share=False,
        seed=int(seed) if seed is not None else stage_seed(int(cfg.get("seed", 0)), base.instance),
    )
    return OmegaConf.create(settings)


def control_target(spec: StageSpec, specs: Sequence[StageSpec]) -> int | None:
    """For a control stage, the index of the entry it controls (the latest of that name before it)."""
    target = spec.config.get("control_of")
    if target is None:
        return None
    return max(s.index for s in specs[: spec.index] if s.name == str(target))


def rollout_stage(
    specs: Sequence[StageSpec], index: int, style: str | None, given=None, setting: str = "rollouts_from"
) -> StageSpec:
    """The ``rollout`` stage whose set the stage at ``index`` reads (for ``style``): ``given`` (its
    ``setting``, e.g. ``rollouts_from``), a rollout stage that runs before it (and samples ``style``, unless
    None); else the one rollout stage of ``style`` that runs before it. A stage named twice before it: its
    latest entry. Raises :class:`PipelineConfigError` when there is none, or when several stages of that
    style run before it (teacher and student rollouts, say) and ``setting`` does not choose one."""
    here = specs[index]
    earlier = [s for s in specs[:index] if s.kind == "rollout"]
    names = list(dict.fromkeys(s.name for s in earlier))
    key = f"pipeline.stages.{here.name}.{setting}"
    if given is not None:
        named = [s for s in earlier if s.name == str(given)]
        if not named:
            raise PipelineConfigError(
                f"{key}={given!r}: no `rollout` stage of that name runs before stage {here.name!r} in "
                f"pipeline.order{_suggest(str(given), names)} (rollout stages before it: {names})"
            )
        found = named[-1]
        sampled = str(found.config.get("style"))
        if style is not None and sampled != style:
            raise PipelineConfigError(
                f"{key}={given!r}: that rollout stage samples style {sampled!r}, but stage {here.name!r} reads "
                f"style {style!r}: set pipeline.stages.{here.name}.style={sampled} or choose another rollout stage"
            )
        return found
    matching = [s for s in earlier if str(s.config.get("style")) == style]
    candidates = list(dict.fromkeys(s.name for s in matching))
    if not candidates:
        raise PipelineConfigError(
            f"stage {here.name!r} ({here.kind}) reads a rollout set of style {style!r}, but no `rollout` stage "
            f"samples that style before it in pipeline.order (rollout stages before it: {names})"
        )
    if len(candidates) > 1:
        raise PipelineConfigError(
            f"stage {here.name!r} ({here.kind}) reads a rollout set of style {style!r} and {len(candidates)} "
            f"rollout stages sample it before it ({candidates}): set {key} to one of them"
        )
    return matching[-1]


def score_slots(specs: Sequence[StageSpec], index: int) -> list[tuple[str, str, str | None]]:
    """``(style, sequences, rollout stage or None)`` of each store the ``score`` stage at ``index`` writes:
    every style of ``styles`` on the labels; on rollouts, the ``rollouts_from`` stage's set in the style it
    sampled (which ``styles`` must hold), or by default each style's one rollout stage before it."""
    spec = specs[index]
    styles = [str(s) for s in ([spec.config.styles] if isinstance(spec.config.styles, str) else spec.config.styles)]
    sequences, given = str(spec.config.get("sequences", "labels")), spec.config.get("rollouts_from")
    if sequences != "rollouts":
        if given is not None:
            raise PipelineConfigError(
                f"pipeline.stages.{spec.name}.rollouts_from={given!r} applies to sequences: rollouts only "
                f"(the stage scores {sequences})"
            )
        return [(style, sequences, None) for style in styles]
    if given is not None:
        sampled = str(rollout_stage(specs, index, None, given).config.get("style"))
        if sampled not in styles:
            raise PipelineConfigError(
                f"pipeline.stages.{spec.name}.rollouts_from={given!r} samples style {sampled!r}, which the "
                f"stage's styles {styles} leave out: add it to pipeline.stages.{spec.name}.styles"
            )
        return [(sampled, sequences, str(given))]
    return [(style, sequences, rollout_stage(specs, index, style).name) for style in styles]
