"""What an evaluation will do, decided before it runs: the examples (with their references), the metric, the
data's identity. Pipelines build one per evaluating stage at start, so a metric that cannot apply is refused
before any training; ``kdpipe-eval`` builds one for its model or predictions."""

from __future__ import annotations

from dataclasses import dataclass

from kdpipe.data.encode import system_prompt_for
from kdpipe.data.sources import data_identity, describe_data, load_examples
from kdpipe.eval.evaluate import with_references
from kdpipe.eval.metrics import LossOnly, Metric, UserMetric, build_metric, coverage


class MetricNotApplicable(ValueError):
    """The configured metric has no reference to compare with in any example of the data."""


@dataclass
class EvalPlan:
    """One evaluation: ``examples`` carry their ``reference``; ``covered``: how many have a usable reference."""

    split: str
    style: str | None
    system_prompt: str | None
    examples: list[dict]
    metric: Metric
    data: dict
    covered: int
    requested: str  # the metric as configured (e.g. ``auto``), beside what it resolved to

    @property
    def note(self) -> str | None:
        """A line worth printing: ``auto`` fell back to the loss, or some examples cannot be scored."""
        if isinstance(self.metric, LossOnly) and self.requested == "auto":
            return (
                f"eval.metric=auto: no numeric reference answers in {self.data['described']}: reporting the "
                "loss only (choose eval.metric=answer_match/reference_match/contains_reference to score replies)"
            )
        if self.metric.generates and not isinstance(self.metric, UserMetric) and self.covered < len(self.examples):
            left = len(self.examples) - self.covered
            return f"{self.metric.name}: {left} of {len(self.examples)} examples have no usable reference: left out"
        return None


def _requested(spec) -> str:
    if spec is None or isinstance(spec, str):
        return str(spec or "auto")
    return str(spec.get("_target_", spec))


def plan_evaluation(data_cfg, eval_cfg, style: str | None, *, metric_spec=None) -> EvalPlan:
    """The evaluation ``eval_cfg`` (a stage's ``eval`` block, or ``kdpipe-eval``'s keys) describes on ``data_cfg``.
    Raises :class:`MetricNotApplicable` for a scoring metric that no example gives a reference to."""
    split = str(eval_cfg.get("split") or "test")
    examples = load_examples(data_cfg, split)
    if eval_cfg.get("limit"):
        examples = examples[: int(eval_cfg.limit)]
    examples = with_references(examples, style)
    spec = metric_spec if metric_spec is not None else eval_cfg.get("metric")
    try:
        metric = build_metric(
            spec,
            extractor=eval_cfg.get("extractor"),
            pattern=eval_cfg.get("pattern"),
            data_cfg=data_cfg,
            examples=examples,
        )
    except ValueError as err:
        raise MetricNotApplicable(str(err)) from err
    covered = coverage(metric, examples)
    described = describe_data(data_cfg, split)
    if metric.generates and covered == 0:
        raise MetricNotApplicable(
            f"eval.metric={metric.name} has nothing to compare with: none of the {len(examples)} examples of "
            f"{described} has an `answer` field or a reference reply it can read (style {style!r}); "
            "use eval.metric=loss, or give the records an `answer`"
        )
    return EvalPlan(
        split=split,
        style=style,
        system_prompt=system_prompt_for(data_cfg, style),
        examples=examples,
        metric=metric,
        data=data_identity(data_cfg, split, examples),
        covered=covered,
        requested=_requested(spec),
    )
