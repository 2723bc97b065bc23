"""Preflight checks of the teacher stores and rollout sets a run reads: each KD stage has a store written
before it or given (and readable), and what finished stages wrote is still whole (for a resume)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kdpipe.data.rollouts import MANIFEST as ROLLOUT_MANIFEST
from kdpipe.data.scorers import needs_store
from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.result import Slot, slot_key
from kdpipe.pipeline.spec import StageSpec, rollout_stage, score_slots, stage_styles
from kdpipe.store.reader import StoreError, TeacherStore


def _written_before(specs: Sequence[StageSpec], index: int) -> set[Slot]:
    """The store slots that the score stages before ``index`` write (those that resolve: the others are named
    by :func:`check_rollouts`)."""
    slots: set[Slot] = set()
    for earlier, spec in enumerate(specs[:index]):
        if spec.kind == "score":
            try:
                slots.update(score_slots(specs, earlier))
            except PipelineConfigError:
                continue
    return slots


def label_slot(specs: Sequence[StageSpec], index: int) -> Slot | None:
    """The store slot of a training stage's label pool (its labels, or its ``data_from`` rollout set); None
    when it does not resolve (:func:`check_rollouts` names why)."""
    settings, styles = specs[index].config, stage_styles(specs[index].config)
    if len(styles) != 1:
        return None
    if settings.get("data_from") is None:
        return (styles[0], "labels", None)
    try:
        return (styles[0], "rollouts", rollout_stage(specs, index, styles[0], settings.data_from, "data_from").name)
    except PipelineConfigError:
        return None


def _onpolicy_slot(specs: Sequence[StageSpec], index: int) -> Slot | None:
    settings, styles = specs[index].config, stage_styles(specs[index].config)
    if len(styles) != 1:
        return None
    try:
        source = rollout_stage(specs, index, styles[0], settings.get("onpolicy_from"), "onpolicy_from")
    except PipelineConfigError:
        return None
    return (styles[0], "rollouts", source.name)


def open_store(path: Path, verify: str) -> str | None:
    """None if the store at ``path`` is finished and intact (``verify=full``: every shard's sha256; ``size``:
    shard files exist), else what is wrong."""
    try:
        store = TeacherStore(path)
        if verify == "full":
            store.verify_all()
    except (StoreError, OSError, ValueError, KeyError) as err:
        return str(err)
    return None


def check_stores(specs: Sequence[StageSpec], done: dict[Slot, Path], verify: str) -> list[str]:
    """Every store a stage reads: a path given must be an intact store; ``auto`` needs a finished stage's store
    (``done``: on a resume) or a ``score`` stage earlier in the order that will write it (on the stage's
    labels, or on the rollout set its ``data_from`` / ``onpolicy_from`` names)."""
    problems = []
    for index, spec in enumerate(specs):
        settings = spec.config
        ratio = float(settings.get("onpolicy_lambda", 0.0) or 0.0)
        reads = []
        if spec.kind == "kd" and ratio < 1:
            reads.append(("store", label_slot(specs, index)))
        if spec.kind == "kd" and ratio > 0:
            reads.append(("onpolicy_store", _onpolicy_slot(specs, index)))
        if spec.kind in ("sft", "kd") and needs_store(settings.get("curriculum") or {}) and not reads:
            reads.append((None, label_slot(specs, index)))
        for setting, slot in reads:
            given = settings.get(setting) if setting else None
            if given not in (None, "auto"):
                problem = open_store(Path(str(given)), verify)
                if problem:
                    problems.append(f"pipeline.stages.{spec.name}.{setting}={given}: {problem}")
                continue
            if slot is None:
                continue  # the stage names this itself (one store covers one style), or check_rollouts does
            if slot in done or slot in _written_before(specs, index):
                continue
            style, sequences, source = slot
            what = f"the rollout set of stage {source!r}" if sequences == "rollouts" else "its label sequences"
            fix = (
                f"a `score` stage with sequences: rollouts and rollouts_from: {source} (styles holding {style!r})"
                if sequences == "rollouts"
                else f"a `score` stage scoring style {style!r}"
            )
            other = (
                f"set pipeline.stages.{spec.name}.{setting}=<store path>"
                if setting
                else "choose a curriculum scorer that does not read it"
            )
            reader = "its curriculum scorer reads" if setting is None else "reads"
            problems.append(
                f"stage {spec.name!r} ({spec.kind}) {reader} a teacher store of {what} (style {style!r}) that no "
                f"earlier stage writes: put {fix} before it in pipeline.order, or {other}"
            )
    return problems


def check_finished(stores: dict[Slot, Path], rollouts: dict[str, Path], verify: str) -> list[str]:
    """On a resume: the stores and rollout sets finished stages left are still intact."""
    problems = []
    for slot, path in sorted(stores.items(), key=lambda item: slot_key(item[0])):
        problem = open_store(Path(path), verify)
        if problem:
            problems.append(
                f"the {slot_key(slot)} store a finished stage wrote is damaged: {problem}; "
                f"move it away (mv {path} {path}.broken) and start a new run with the same command: its score stage "
                "scores it again (store_verify=size starts anyway, and fails when training reads the damaged shard)"
            )
    for name, path in sorted(rollouts.items()):
        manifest = Path(path) / ROLLOUT_MANIFEST
        if not manifest.exists():
            problems.append(
                f"the rollout set of stage {name!r} ({path}) has no {ROLLOUT_MANIFEST}: unfinished, or removed"
            )
    return problems
