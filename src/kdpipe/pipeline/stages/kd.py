"""``kd``: distillation from a stored teacher signal (plus CE on the labels), then (optionally) evaluation.

``onpolicy_lambda`` > 0 mixes in the student's own responses (a rollout set scored by the teacher:
``onpolicy_from``, or the one rollout stage of the stage's style before it): that share of every batch is
on-policy, the rest label-conditioned. ``data_from`` replaces the label pool by a rollout stage's kept
responses (e.g. the teacher's: sequence-level KD), read with the store scored on that set."""

from __future__ import annotations

from omegaconf import OmegaConf

from kdpipe.data.rollouts import load_rollouts
from kdpipe.errors import PipelineConfigError
from kdpipe.modules import KDModule
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.fit import fit_stage, make_datamodule, optimizer_parts
from kdpipe.pipeline.stages.weights import load_trainable
from kdpipe.store.posthoc import PostHocStore
from kdpipe.store.reader import TeacherStore


def run_kd(ctx: StageContext) -> StageResult:
    ratio = float(ctx.settings.onpolicy_lambda)
    if not 0.0 <= ratio <= 1.0:
        raise PipelineConfigError(f"pipeline.stages.{ctx.spec.name}.onpolicy_lambda={ratio} must be in [0, 1]")
    # teacher_k / teacher_temperature: the store read at k' <= k or at another temperature, without a new capture
    k, temperature = ctx.settings.get("teacher_k"), ctx.settings.get("teacher_temperature")

    def opened(path) -> PostHocStore:
        try:
            return PostHocStore(TeacherStore(path), k=k, temperature=temperature)
        except ValueError as err:
            raise PipelineConfigError(f"pipeline.stages.{ctx.spec.name}: {err} at {path}") from err

    store = opened(ctx.store("store")) if ratio < 1 else None  # on the labels, or on the data_from rollout set
    onpolicy = None
    if ratio > 0:
        style = ctx.single_style("the on-policy pool")
        source = ctx.rollout_source("onpolicy_from", style)
        onpolicy_store = opened(ctx.store("onpolicy_store", (style, "rollouts", source)))
        onpolicy = (load_rollouts(ctx.rollout_set(source)), onpolicy_store, ratio)
    model, tokenizer = load_trainable(ctx)
    module = KDModule(
        model, loss=OmegaConf.to_container(ctx.settings.loss, resolve=True), **optimizer_parts(ctx.settings)
    )
    datamodule = make_datamodule(ctx, tokenizer, store=store, model=module.model, onpolicy=onpolicy)
    result = fit_stage(ctx, module, tokenizer, datamodule)
    if store is not None:
        result.reads["store"] = str(store.path)
        result.metrics.update(teacher_k=store.k, teacher_temperature=store.temperature)
    if ctx.data_from is not None:
        result.reads["data_from"] = str(ctx.rollout_set(ctx.data_from))
    if onpolicy is not None:
        result.reads["onpolicy_store"] = str(onpolicy[1].path)
        result.reads["onpolicy_from"] = str(ctx.rollout_set(source))
        result.metrics["onpolicy_examples"] = len(datamodule.encode_onpolicy())
    return result
