"""``rollout``: the stage's model (the student for on-policy data, or the teacher for sequence-level KD data)
samples ``n_samples`` responses per prompt into ``<stage>/rollouts`` (resumable: written in parts, each
atomically). Later stages find the set by this stage's name (``rollouts_from``, ``data_from``,
``onpolicy_from``)."""

from __future__ import annotations

import time

from kdpipe.data.encode import system_prompt_for
from kdpipe.data.rollouts import RolloutSettings, task_answer, withhold_labels
from kdpipe.data.sources import load_examples, outside_subset_by_id
from kdpipe.engines.rollouts import write_rollouts
from kdpipe.engines.vllm_engine import VllmEngine, VllmSettings, checkpoint_fingerprint
from kdpipe.eval import with_references
from kdpipe.eval.metrics import AnswerMatch, auto_metric
from kdpipe.lightning.trainer import inference_device
from kdpipe.models.fingerprint import model_fingerprint
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.weights import inference_checkpoint, load_model_and_tokenizer
from kdpipe.utils.dist import rank_zero_console

console = rank_zero_console()


class DerivedAnswerMatch(AnswerMatch):
    """``Answer: N`` checked against the answer the task computes from the prompt (labels withheld)."""

    def __init__(self, derive) -> None:
        super().__init__("answer_colon")
        self.derive = derive

    def reference_of(self, example: dict) -> str | None:
        return self.derive(example)


def rollout_prompts(ctx: StageContext) -> list[dict]:
    """The prompts the stage samples from: its ``split``, less the ``exclude_fraction`` subset (the one a
    training stage's ``train_fraction`` of that value selects), then the first ``limit``; with
    ``withhold_labels``, stripped of every label."""
    settings = ctx.settings
    prompts = load_examples(ctx.data, str(settings.split))
    if settings.get("exclude_fraction"):
        prompts = outside_subset_by_id(prompts, float(settings.exclude_fraction))
    if settings.get("limit"):
        prompts = prompts[: int(settings.limit)]
    return withhold_labels(prompts) if settings.get("withhold_labels") else prompts


def run_rollout(ctx: StageContext) -> StageResult:
    settings = ctx.settings
    style = str(settings.style)
    engine = str(settings.get("engine") or "hf")
    if engine == "vllm":  # vLLM loads the checkpoint folder itself
        model_dir, tokenizer = inference_checkpoint(ctx)
        model = VllmEngine(model_dir, VllmSettings.from_config(settings.get("vllm")), 1)
        fingerprint = checkpoint_fingerprint(model_dir)
    else:
        model, tokenizer = load_model_and_tokenizer(ctx)
        model.to(inference_device(ctx.cfg.trainer))
        fingerprint = model_fingerprint(model)
    prompts = rollout_prompts(ctx)
    withheld = bool(settings.get("withhold_labels"))
    derive = task_answer(ctx.data) if withheld else None
    # what `correct` means: the task's check on the record's labels, or on the prompt alone (labels withheld)
    metric = DerivedAnswerMatch(derive) if derive else auto_metric(ctx.data, with_references(prompts, style))
    rollout_settings = RolloutSettings(
        style=style,
        n_samples=int(settings.n_samples),
        temperature=float(settings.temperature),
        top_p=float(settings.top_p),
        max_new_tokens=int(settings.max_new_tokens),
        batch_size=int(settings.batch_size),
        part_size=int(settings.part_size),
        seed=ctx.seed,
        drop_truncated=bool(settings.filters.drop_truncated),
        only_correct=bool(settings.filters.only_correct),
    )
    root = ctx.stage_dir / "rollouts"
    started = time.perf_counter()
    console.print(f"sampling {rollout_settings.n_samples} x {len(prompts)} responses into {root}")
    info = {
        "model": fingerprint,
        "engine": {"name": "hf"} if engine == "hf" else {**model.identity(), "deterministic": False},
        "model_name": ctx.spec.model,
        "stage": ctx.spec.name,
        "split": str(settings.split),
        "exclude_fraction": settings.get("exclude_fraction"),
        "withhold_labels": withheld,
    }
    manifest = write_rollouts(
        root,
        model,
        tokenizer,
        prompts,
        rollout_settings,
        system_prompt=system_prompt_for(ctx.data, style),
        info=info,
        metric=metric,
    )
    samples = max(int(manifest["samples"]), 1)
    metrics = {
        "prompts": manifest["prompts"],
        "samples": manifest["samples"],
        "kept": manifest["kept"],
        "truncated_fraction": manifest["truncated"] / samples,
        "sample_accuracy": 1 - manifest["incorrect"] / samples,
        "seconds": time.perf_counter() - started,
    }
    return StageResult(metrics, rollouts={style: root.resolve()})
