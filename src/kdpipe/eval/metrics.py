"""Evaluation metrics: how one reply is scored against an example's reference.

A metric scores ``(prediction, example) -> float | None``: the reply a model gave and the example it
answered, with ``example["answer"]`` (the record's answer field, if any) and ``example["reference"]`` (the
reference reply of the evaluated style: a prompt/response record's response, a chat record's last assistant
turn). None means "no usable reference": the example is left out of the score and counted.

- :class:`AnswerMatch` (``answer_match``): the final answer, extracted from the reply
  (:mod:`kdpipe.eval.answers`), equals the reference answer: the ``answer`` field, or else the same extractor
  applied to the reference reply; both normalised.
- :class:`ReferenceMatch` (``reference_match``): the whole reply equals the reference, normalised.
- :class:`ContainsReference` (``contains_reference``): the reply contains the reference, normalised.
- :class:`LossOnly` (``loss``): no generation; the teacher-forced loss (reported beside every metric) only.
- any callable ``(prediction, example) -> float | None`` of your own, named by ``_target_``.

The reference is the ``answer`` field when present, else the reference reply. ``auto`` (the default) picks
``answer_match`` with ``answer_colon`` for the built-in task, ``answer_match`` with ``last_number`` when at
least half of the references hold a number, and ``loss`` only otherwise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from kdpipe.eval.answers import TRAILING, last_number, make_extractor, normalize_answer
from kdpipe.utils.paths import config_dir

METRIC_NAMES = ("auto", "answer_match", "reference_match", "contains_reference", "loss")
NUMERIC_SHARE = 0.5  # auto: answer_match/last_number when at least this share of the references hold a number


@dataclass(frozen=True)
class Scored:
    """One reply scored: the score (None: no usable reference) and, for answer metrics, what was compared."""

    score: float | None
    prediction: str | None = None
    reference_answer: str | None = None


def _text(value: str) -> str:
    return " ".join(value.casefold().split())


class Metric:
    """Base of the built-in metrics: a name, whether it needs generated replies, and :meth:`score`."""

    name = "metric"
    generates = True

    def reference_of(self, example: dict) -> str | None:
        """What a reply is compared with: the ``answer`` field, else the reference reply; None if neither."""
        answer = example.get("answer")
        if answer is not None and str(answer).strip():
            return str(answer)
        return example.get("reference")

    def score(self, prediction: str, example: dict) -> Scored:
        """The reply scored against the example's reference; ``Scored(None)`` when it has none."""
        reference = self.reference_of(example)
        return Scored(None) if reference is None else self.compare(prediction, reference)

    def compare(self, prediction: str, reference: str) -> Scored:
        raise NotImplementedError

    def __call__(self, prediction: str, example: dict) -> float | None:
        return self.score(prediction, example).score


class AnswerMatch(Metric):
    """The extracted final answer equals the reference answer (both normalised)."""

    def __init__(self, extractor: str = "last_number", pattern: str | None = None) -> None:
        self.extractor, self.pattern = extractor, pattern
        self.extract = make_extractor(extractor, pattern)

    @property
    def name(self) -> str:
        return f"answer_match({self.extractor})"

    def reference_of(self, example: dict) -> str | None:
        answer = example.get("answer")
        if answer is not None and str(answer).strip():
            return str(answer)
        reference = example.get("reference")
        return None if reference is None else self.extract(reference)

    def compare(self, prediction: str, reference: str) -> Scored:
        found = self.extract(prediction)
        same = found is not None and normalize_answer(found) == normalize_answer(reference)
        return Scored(float(same), found, reference)


class ReferenceMatch(Metric):
    """The whole reply equals the reference (normalised: case, whitespace, trailing punctuation, numbers)."""

    name = "reference_match"

    def compare(self, prediction: str, reference: str) -> Scored:
        return Scored(float(normalize_answer(prediction) == normalize_answer(reference)), None, reference)


class ContainsReference(Metric):
    """The reply contains the reference (case, runs of whitespace and its trailing punctuation ignored)."""

    name = "contains_reference"

    def compare(self, prediction: str, reference: str) -> Scored:
        reply = _text(prediction)
        forms = {_text(reference.strip().rstrip(TRAILING)), normalize_answer(reference)}  # "1,000" or "1000"
        return Scored(float(any(form and form in reply for form in forms)), None, reference)


class LossOnly(Metric):
    """No generation: the teacher-forced loss of the reference replies is the evaluation."""

    name = "loss"
    generates = False

    def score(self, prediction: str, example: dict) -> Scored:
        return Scored(None)


class UserMetric(Metric):
    """A callable ``(prediction, example) -> float | None`` of the user's own (bool counts as 0/1)."""

    def __init__(self, fn: Callable[[str, dict], float | None], name: str) -> None:
        self.fn, self.name = fn, name

    def score(self, prediction: str, example: dict) -> Scored:
        value = self.fn(prediction, example)
        return Scored(None if value is None else float(value))


def _metric_file(name: str) -> Path:
    return Path(config_dir()) / "eval" / "metric" / f"{name}.yaml"


def auto_metric(data_cfg, examples: Sequence[dict]) -> Metric:
    """``auto``: the built-in task's ``Answer: N``; else numbers at the end of numeric references; else loss."""
    if data_cfg is not None and data_cfg.get("source") == "arith":
        return AnswerMatch("answer_colon")
    references = [r for r in (Metric().reference_of(e) for e in examples) if r is not None]
    numeric = sum(last_number(r) is not None for r in references)
    if references and numeric >= NUMERIC_SHARE * len(references):
        return AnswerMatch("last_number")
    return LossOnly()


def build_metric(
    spec, *, extractor: str | None = None, pattern: str | None = None, data_cfg=None, examples: Sequence[dict] = ()
) -> Metric:
    """The metric of an ``eval.metric`` setting: a name of ``configs/eval/metric/`` (or ``auto``, decided on
    ``examples``, which carry their ``reference``), or a ``{_target_: ...}`` of the user's own.
    ``extractor``/``pattern`` (``eval.extractor``/``eval.pattern``) override an answer metric's."""
    if spec is None or spec == "auto":
        metric = auto_metric(data_cfg, examples)
        if isinstance(metric, AnswerMatch) and extractor:
            metric = AnswerMatch(extractor, pattern)
        return metric
    if isinstance(spec, str):
        if spec not in METRIC_NAMES or not _metric_file(spec).exists():
            raise ValueError(f"eval.metric={spec!r}: choose one of {list(METRIC_NAMES)}, or a {{_target_: ...}}")
        spec = OmegaConf.load(_metric_file(spec))
    if not isinstance(spec, dict | DictConfig) or "_target_" not in spec:
        raise ValueError(f"eval.metric: expected a name or a mapping with _target_, got {spec!r}")
    spec = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(spec), resolve=True))
    if "extractor" in spec and extractor:
        spec.extractor, spec.pattern = extractor, pattern
    elif "extractor" in spec and spec.get("extractor") == "auto":
        spec.extractor = "answer_colon" if data_cfg is not None and data_cfg.get("source") == "arith" else "last_number"
    made = hydra.utils.instantiate(spec)
    if isinstance(made, Metric):
        return made
    if not callable(made):
        raise ValueError(f"eval.metric._target_={spec._target_}: not a callable (prediction, example) -> score")
    return UserMetric(made, str(spec._target_))


def coverage(metric: Metric, examples: Sequence[dict]) -> int:
    """How many examples have a usable reference for ``metric`` (a user metric: all of them, it decides)."""
    if isinstance(metric, UserMetric):
        return len(examples)
    return sum(metric.reference_of(e) is not None for e in examples)


def last_user_turn(example: dict) -> str | None:
    """The user's message an evaluation answers: the prompt, or a chat record's last user turn."""
    if "messages" in example:
        users = [m["content"] for m in example["messages"] if m["role"] == "user"]
        return users[-1] if users else None
    return example.get("prompt")


def score_replies(metric: Metric, examples: Sequence[dict], replies: Sequence[str]) -> list[Scored]:
    """Score every reply against its example (which carries its ``reference``)."""
    return [metric.score(reply, example) for example, reply in zip(examples, replies)]


def summarize(metric: Metric, examples: Sequence[dict], scored: Sequence[Scored], generations=None) -> dict:
    """Accuracy (mean score over the examples with a reference; None if none has one), per level, coverage,
    and with ``generations`` (:class:`~kdpipe.eval.generate.Generation`) response length and truncation."""
    by_level: dict[int, list[float]] = defaultdict(list)
    scores = [s.score for s in scored if s.score is not None]
    for example, s in zip(examples, scored):
        if s.score is not None and example.get("level") is not None:
            by_level[int(example["level"])].append(s.score)
    n = len(examples)
    metrics: dict = {"metric": metric.name, "num_examples": n}
    if metric.generates:
        metrics.update(
            accuracy=sum(scores) / len(scores) if scores else None,
            accuracy_by_level={str(k): sum(v) / len(v) for k, v in sorted(by_level.items())},
            scored_examples=len(scores),
            unscored_examples=n - len(scores),
            coverage=len(scores) / n if n else None,
        )
    if generations is not None and n:
        metrics["mean_response_tokens"] = sum(g.num_tokens for g in generations) / n
        metrics["truncated_fraction"] = sum(not g.finished for g in generations) / n
    return metrics


def records(examples: Sequence[dict], replies: Sequence[str], scored: Sequence[Scored], generations=None) -> list:
    """One ``generations.jsonl`` record per example: what was asked, the reference, the reply, the score."""
    out = []
    for i, (example, reply, s) in enumerate(zip(examples, replies, scored)):
        record = {
            "id": example["id"],
            "level": example.get("level"),
            "prompt": last_user_turn(example),
            "reference": example.get("reference"),
            "reply": reply,
            "prediction": s.prediction,
            "reference_answer": s.reference_answer,
            "score": s.score,
        }
        if generations is not None:
            record.update(num_tokens=generations[i].num_tokens, finished=generations[i].finished)
        out.append(record)
    return out


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)`` of a mean per-token cross-entropy (None stays None; overflow is inf)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
