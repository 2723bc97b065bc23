"""``rollout``: the current model samples ``n_samples`` responses per prompt into ``<stage>/rollouts``
(resumable: written in parts, each atomically)."""

from __future__ import annotations

import time

from kdpipe.data.encode import system_prompt_for
from kdpipe.data.rollouts import RolloutSettings
from kdpipe.data.sources import load_examples
from kdpipe.engines.rollouts import write_rollouts
from kdpipe.eval import with_references
from kdpipe.eval.metrics import auto_metric
from kdpipe.lightning.trainer import inference_device
from kdpipe.models.fingerprint import model_fingerprint
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.weights import load_model_and_tokenizer
from kdpipe.utils.dist import rank_zero_console

console = rank_zero_console()


def run_rollout(ctx: StageContext) -> StageResult:
    settings = ctx.settings
    style = str(settings.style)
    model, tokenizer = load_model_and_tokenizer(ctx)
    model.to(inference_device(ctx.cfg.trainer))
    prompts = load_examples(ctx.cfg.data, str(settings.split))
    if settings.get("limit"):
        prompts = prompts[: int(settings.limit)]
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
    manifest = write_rollouts(
        root,
        model,
        tokenizer,
        prompts,
        rollout_settings,
        system_prompt=system_prompt_for(ctx.cfg.data, style),
        info={"model": model_fingerprint(model), "split": str(settings.split)},
        metric=auto_metric(ctx.cfg.data, with_references(prompts, style)),  # what `correct` means
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
