"""``sft``: supervised fine-tuning on one or more response styles, then (optionally) evaluation. ``data_from``:
on a rollout stage's kept responses (e.g. a teacher's over unlabelled prompts) instead of the data's labels."""

from __future__ import annotations

from kdpipe.modules import SFTModule
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.fit import fit_stage, make_datamodule, optimizer_parts
from kdpipe.pipeline.stages.weights import load_trainable


def run_sft(ctx: StageContext) -> StageResult:
    model, tokenizer = load_trainable(ctx)
    module = SFTModule(model, **optimizer_parts(ctx.settings))
    result = fit_stage(ctx, module, tokenizer, make_datamodule(ctx, tokenizer, model=model))
    if ctx.data_from is not None:  # trained on a rollout stage's responses (e.g. the teacher's)
        result.reads["data_from"] = str(ctx.rollout_set(ctx.data_from))
    return result
