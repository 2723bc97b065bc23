"""Evaluation shared by the ``eval`` stage, SFT/KD stages and ``kdpipe-eval``: generation, metrics, scoring."""

from kdpipe.eval.evaluate import evaluate_model, score_predictions, with_references
from kdpipe.eval.generate import generate_responses
from kdpipe.eval.metrics import Metric, build_metric, coverage

__all__ = [
    "Metric",
    "build_metric",
    "coverage",
    "evaluate_model",
    "generate_responses",
    "score_predictions",
    "with_references",
]
