"""Checks a pipeline passes before any stage runs (beyond the stage specs themselves): teacher and student
share one vocabulary, the trainer's device can be used here, every evaluation's metric applies to its data."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from kdpipe.data.scorers import needs_store
from kdpipe.data.sources import load_split
from kdpipe.errors import PipelineConfigError
from kdpipe.eval.metrics import UserMetric
from kdpipe.eval.plan import MetricNotApplicable, plan_evaluation
from kdpipe.models.factory import build_tokenizer
from kdpipe.models.vocab import vocabulary_differences
from kdpipe.pipeline.spec import StageSpec, stage_data, stage_styles
from kdpipe.utils.dist import rank_zero_console

console = rank_zero_console()


def teacher_student_pairs(specs: Sequence[StageSpec]) -> list[tuple[str, str]]:
    """(scoring model, distilled model) pairs: every ``score`` stage's model against every model trained on a
    store (``kd`` stages, and stages whose curriculum reads the teacher store), where the two differ."""
    teachers = sorted({s.model for s in specs if s.kind == "score"})
    reads_store = [s for s in specs if s.kind == "kd" or needs_store(s.config.get("curriculum") or {})]
    students = sorted({s.model for s in reads_store})
    return [(t, s) for t in teachers for s in students if t != s]


def check_shared_vocabulary(cfg: DictConfig, specs: Sequence[StageSpec]) -> None:
    """Raise :class:`PipelineConfigError` when a teacher and a student of the pipeline tokenize differently."""
    pairs = teacher_student_pairs(specs)
    if not pairs:
        return
    cache_root = Path(str(cfg.paths.log_dir)).expanduser() / "converted"
    loaded: dict[str, PreTrainedTokenizerBase] = {}

    def tokenizer_of(name: str) -> PreTrainedTokenizerBase:
        model_cfg = cfg.models[name]
        key = json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True, default=str)
        if key not in loaded:
            loaded[key] = build_tokenizer(model_cfg, cache_root)
        return loaded[key]

    for teacher, student in pairs:
        problems = vocabulary_differences(tokenizer_of(teacher), tokenizer_of(student), (teacher, student))
        if problems:
            raise PipelineConfigError(
                f"models.{teacher} scores a teacher signal that models.{student} is distilled on, but their "
                f"tokenizers differ: {'; '.join(problems)}. Teacher and student must share one vocabulary "
                f"(same tokens and ids), chat template and special tokens."
            )


EVALUATING_KINDS = ("sft", "kd", "eval")


def eval_style(settings: DictConfig) -> str:
    """The style a stage evaluates in: ``eval.style``, else its (first) ``style``."""
    return str(settings.eval.get("style") or (stage_styles(settings) or ["reasoning"])[0])


def check_evaluations(cfg: DictConfig, specs: Sequence[StageSpec]) -> dict[str, str]:
    """Every evaluating stage's metric applies to the data it scores, or :class:`PipelineConfigError` names the
    stage, the metric and the data. Returns each such stage's resolved metric name (e.g. ``loss`` for an
    ``auto`` that found no reference answers); prints what is worth knowing (a fallback, left-out examples)."""
    resolved: dict[str, str] = {}
    notes: set[str] = set()
    for spec in specs:
        settings = spec.config
        if spec.kind not in EVALUATING_KINDS or not settings.get("eval") or not settings.eval.get("enabled", True):
            continue
        if str(settings.eval.get("backend") or "kdpipe") == "lm_eval":
            check_lm_eval(spec.name, settings.eval)
            resolved[spec.name] = "lm_eval"
            continue
        try:
            plan = plan_evaluation(stage_data(cfg, settings), settings.eval, eval_style(settings))
        except MetricNotApplicable as err:
            raise PipelineConfigError(f"stage {spec.name!r}: {err}") from err
        check_prompt_only(cfg, spec, plan)
        resolved[spec.name] = plan.metric.name
        if plan.note and plan.note not in notes:
            notes.add(plan.note)
            console.print(f"[yellow]{plan.note}")
    return resolved


def check_prompt_only(cfg: DictConfig, spec: StageSpec, plan) -> None:
    """An evaluation refuses the prompt-only records (no response) of its split that its metric cannot score:
    every one under ``loss`` or ``reference_match``-like metrics, those without an ``answer`` under
    ``answer_match``; a metric of your own (``_target_``) decides for itself."""
    metric = plan.metric
    if isinstance(metric, UserMetric):
        return
    unscorable = {
        e["id"]
        for e in plan.examples
        if e.get("unlabelled") and (not metric.generates or metric.reference_of(e) is None)
    }
    if not unscorable:
        return
    located = load_split(stage_data(cfg, spec.config), plan.split).unlabelled
    where = next((w for id_, w in located if id_ in unscorable), plan.data.get("described"))
    needs = "a response" if not metric.generates else "an `answer` or a response"
    raise PipelineConfigError(
        f"stage {spec.name!r}: eval.split={plan.split!r} has {len(unscorable)} prompt-only record(s) that "
        f"eval.metric={metric.name} cannot score (each needs {needs}), the first at {where}: give them an "
        "`answer`, or evaluate on labelled records"
    )


def check_lm_eval(stage: str, eval_cfg: DictConfig) -> None:
    """``eval.backend=lm_eval`` needs lm-evaluation-harness installed and task names, checked before training."""
    if importlib.util.find_spec("lm_eval") is None:
        raise PipelineConfigError(
            f"stage {stage!r}: eval.backend=lm_eval needs lm-evaluation-harness: pip install 'kdpipe[eval]'"
        )
    if not eval_cfg.get("tasks"):
        raise PipelineConfigError(f"stage {stage!r}: eval.backend=lm_eval needs eval.tasks, e.g. '[gsm8k]'")


def check_optimized_metric(cfg: DictConfig, metrics: dict[str, str]) -> None:
    """A sweep optimises ``optimized_metric``: refuse it at start when no stage can report it (``accuracy``
    with only loss-evaluated stages), rather than hand the sweeper None for every trial."""
    name = str(cfg.get("optimized_metric") or "accuracy")
    if not name.startswith("accuracy") or not in_sweep():
        return
    if not any(m not in ("loss", "lm_eval") for m in metrics.values()):
        raise PipelineConfigError(
            f"optimized_metric={name}: no stage of this pipeline scores replies (their evaluations: "
            f"{metrics or 'none'}); optimise `loss` (optimized_metric=loss) or choose an eval.metric that applies"
        )


def in_sweep() -> bool:
    """Whether this process runs a Hydra multirun job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return str(HydraConfig.get().mode) == "RunMode.MULTIRUN"
