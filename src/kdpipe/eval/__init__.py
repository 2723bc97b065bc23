"""Generation-based evaluation shared by the ``eval`` stage, SFT/KD stages and ``kdpipe-eval``."""

from kdpipe.eval.evaluate import evaluate_model
from kdpipe.eval.generate import generate_responses
from kdpipe.eval.metrics import is_correct, summarize

__all__ = ["evaluate_model", "generate_responses", "is_correct", "summarize"]
