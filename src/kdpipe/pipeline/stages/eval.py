"""``eval``: evaluate a model as the previous stage of it left it (a fresh model if none did)."""

from __future__ import annotations

from kdpipe.models.factory import count_parameters
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.fit import evaluate_stage
from kdpipe.pipeline.stages.weights import load_model_and_tokenizer


def run_eval(ctx: StageContext) -> StageResult:
    model, tokenizer = load_model_and_tokenizer(ctx)
    return StageResult({**evaluate_stage(ctx, model, tokenizer), "parameters": count_parameters(model)})
