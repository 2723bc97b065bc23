"""``eval``: evaluate a model as the previous stage of it left it (a fresh model if none did)."""

from __future__ import annotations

from kdpipe.lightning.loggers import log_config, log_results, stage_loggers
from kdpipe.models.factory import count_parameters
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.fit import evaluate_stage, run_config
from kdpipe.pipeline.stages.weights import load_model_and_tokenizer


def run_eval(ctx: StageContext) -> StageResult:
    """Evaluate the model; the stage's loggers record its config, its evaluation (``eval/``) and a sample of its
    generations, as a training stage's do."""
    model, tokenizer = load_model_and_tokenizer(ctx)
    with stage_loggers(ctx.cfg.get("logger"), ctx.run_dir, ctx.stage_dir, ctx.spec.dirname) as loggers:
        log_config(loggers, run_config(ctx))
        evaluation = evaluate_stage(ctx, model, tokenizer, ctx.start_from)
        metrics = {**evaluation, "parameters": count_parameters(model)}
        log_results(loggers, metrics, 0, evaluation, ctx.stage_dir / "generations.jsonl")
    return StageResult(metrics)
