"""The path every training kind shares: DataModule, Trainer, fit (resuming ``last.ckpt``), export, evaluate."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from kdpipe.data.datamodule import PostTrainDataModule, write_skipped_records
from kdpipe.data.rollouts import load_rollouts
from kdpipe.data.scorers import needs_model, needs_store, scorer_config
from kdpipe.errors import PipelineConfigError
from kdpipe.eval import evaluate_model
from kdpipe.eval.plan import EvalPlan, plan_evaluation
from kdpipe.lightning.loggers import checkpoint_step, finish_loggers, log_config, log_results, make_loggers, sweep_job
from kdpipe.lightning.precision import PRECISION_FILE, describe, probe_batch, resolve_stage_precision
from kdpipe.lightning.strategy import shards_weights
from kdpipe.lightning.trainer import inference_device, instantiate_trainer
from kdpipe.models.factory import count_parameters
from kdpipe.models.lora import merged
from kdpipe.modules import SFTModule
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.weights import export_model, trained_model
from kdpipe.store.reader import TeacherStore
from kdpipe.utils.dist import rank_zero_console, run_on_rank_zero
from kdpipe.utils.io import atomic_write_text
from kdpipe.utils.memory import peak_memory_mb

console = rank_zero_console()


def optimizer_parts(settings: DictConfig) -> dict:
    """Module arguments shared by SFT and KD stages: optimizer, schedule, weight decay, loss implementation."""
    return {
        "optimizer": hydra.utils.instantiate(settings.optimizer),
        "scheduler": hydra.utils.instantiate(settings.scheduler) if settings.get("scheduler") else None,
        "weight_decay": float(settings.weight_decay),
        "loss_impl": str(settings.loss_impl),
        "chunk_size": None if settings.loss_chunk_size in (None, "auto") else int(settings.loss_chunk_size),
        "loss_backend": str(settings.get("loss_backend", "auto")),  # runs saved before the key existed: auto
    }


def stage_plan(ctx: StageContext) -> EvalPlan:
    """The stage's evaluation: ``settings.eval`` on the run's data, in ``eval.style`` (default: the first style)."""
    return plan_evaluation(ctx.data, ctx.settings.eval, str(ctx.settings.eval.get("style") or ctx.styles[0]))


def evaluate_stage(ctx: StageContext, model, tokenizer, model_dir: Path | None = None) -> dict:
    """Evaluate ``model`` as the stage's ``eval`` block says (its metric, or lm-evaluation-harness tasks on
    ``model_dir``, its HF export: written to ``<stage>/export`` when None); writes ``generations.jsonl`` (one
    record per example: prompt, reference, reply, extracted answers, score)."""
    eval_cfg = ctx.settings.eval
    if str(eval_cfg.get("backend") or "kdpipe") == "lm_eval":
        model_dir = model_dir or export_model(model, tokenizer, ctx.stage_dir / "export")
        return evaluate_with_lm_eval(ctx, eval_cfg, Path(model_dir))
    plan = stage_plan(ctx)
    model.to(inference_device(ctx.cfg.trainer))
    metrics, records = evaluate_model(
        model,
        tokenizer,
        plan.examples,
        metric=plan.metric,
        style=plan.style,
        system_prompt=plan.system_prompt,
        batch_size=int(eval_cfg.batch_size),
        max_new_tokens=int(eval_cfg.max_new_tokens),
        description=f"eval {ctx.spec.name}",
    )
    if records:
        atomic_write_text(ctx.stage_dir / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {**metrics, "eval_split": plan.split, "eval_data": plan.data}


def evaluate_with_lm_eval(ctx: StageContext, eval_cfg, model_dir: Path) -> dict:
    """``eval.backend=lm_eval``: lm-evaluation-harness ``eval.tasks`` on the stage's export (the generation
    lengths are each task's own ``max_gen_toks``; installed and named tasks are checked at pipeline start)."""
    from kdpipe.eval.lm_eval_backend import run_lm_eval  # optional: kdpipe[eval]

    tasks = [str(t) for t in eval_cfg.tasks]
    try:
        found = run_lm_eval(
            model_dir,
            tasks,
            include_path=eval_cfg.get("include_path"),
            limit=eval_cfg.get("limit"),
            batch_size=int(eval_cfg.batch_size),
            device=str(inference_device(ctx.cfg.trainer)),
            output_dir=ctx.stage_dir / "lm_eval",
        )
    except KeyError as err:  # lm-eval: "Spec 'x' is not a registered task/group/tag name or valid YAML path"
        raise PipelineConfigError(f"stage {ctx.spec.name!r}: eval.tasks={tasks}: {err.args[0]}") from err
    return {"metric": "lm_eval", **found}


def training_pool(ctx: StageContext) -> list[dict] | None:
    """The stage's training examples when ``data_from`` names a rollout stage: that set's kept responses (its
    filters applied) as labels; None: the data config's training split."""
    source = ctx.data_from
    return None if source is None else load_rollouts(ctx.rollout_set(source))


def make_datamodule(ctx: StageContext, tokenizer, store=None, model=None, onpolicy=None) -> PostTrainDataModule:
    """The stage's DataModule; ``model`` is what a ``student_loss`` curriculum scores with; ``onpolicy`` is
    ``(rollout records, their store, lambda)`` for a KD stage that mixes in the student's own responses."""
    settings = ctx.settings
    scorer_store = None
    if store is None and onpolicy is None and needs_store(settings.curriculum):  # e.g. SFT ordered by teacher_nll
        style, _, source = slot = ctx.label_slot()
        if slot not in ctx.stores:
            where = "its labels" if source is None else f"the rollout set of stage {source!r} (data_from)"
            raise PipelineConfigError(
                f"stage {ctx.spec.name!r}: curriculum.scorer={scorer_config(settings.curriculum)['name']} reads "
                f"the teacher store of style {style!r} on {where}: put a `score` stage scoring it before it"
            )
        scorer_store = TeacherStore(ctx.stores[slot])
    return PostTrainDataModule(
        tokenizer,
        data=ctx.data,
        style=ctx.styles,
        curriculum=settings.curriculum,
        batch_size=int(settings.batch_size),
        num_batches=int(settings.max_steps) * int(settings.accumulate_grad_batches),
        seed=ctx.seed,
        eval_batch_size=int(settings.eval.batch_size),
        store=store,
        scorer_store=scorer_store,
        scorer_model=model if needs_model(settings.curriculum) else None,
        score_cache_dir=ctx.stage_dir / "scores",
        train_fraction=float(settings.get("train_fraction", 1.0)),
        train_examples=training_pool(ctx),
        **(dict(zip(("onpolicy_examples", "onpolicy_store", "onpolicy_lambda"), onpolicy)) if onpolicy else {}),
    )


def make_trainer(ctx: StageContext, max_steps: int, loggers: list, precision: str | None = None) -> L.Trainer:
    """The stage's Trainer: the configured callbacks plus ``last.ckpt`` every N steps, one curriculum epoch;
    ``precision`` (resolved from ``trainer.precision``, see :mod:`kdpipe.lightning.precision`)."""
    settings = ctx.settings
    callbacks = [hydra.utils.instantiate(c) for c in (ctx.cfg.get("callbacks") or {}).values() if c is not None]
    if not loggers:  # logger=none: Lightning refuses a LearningRateMonitor without a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(
        ModelCheckpoint(
            dirpath=ctx.stage_dir / "checkpoints",
            filename="step{step}",
            every_n_train_steps=int(settings.checkpoint_every_n_steps),
            save_last=True,
            save_top_k=0,
        )
    )
    val_every = min(int(settings.val_every_n_steps), max_steps * int(settings.accumulate_grad_batches))
    # the curriculum sampler resumes mid-epoch itself (it skips the consumed batches): Lightning's warning
    # about non-resumable dataloaders does not apply
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    return instantiate_trainer(
        ctx.cfg.trainer,
        log_every_n_steps=min(int(ctx.cfg.trainer.get("log_every_n_steps", 50)), max_steps),
        max_steps=max_steps,
        max_epochs=1,  # the curriculum plan is one long "epoch" of exactly max_steps batches
        val_check_interval=val_every,
        accumulate_grad_batches=int(settings.accumulate_grad_batches),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(ctx.stage_dir),
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the curriculum sampler already gives each rank its part
        precision=precision,
    )


def run_config(ctx: StageContext) -> dict:
    """What the loggers record as the stage's hyperparameters: everything that determines its result."""
    return {
        "stage": {
            "name": ctx.spec.name,
            "kind": ctx.spec.kind,
            "index": ctx.spec.index,
            "instance": ctx.spec.instance,
            "seed": ctx.seed,
        },
        "settings": OmegaConf.to_container(ctx.settings, resolve=True),
        "model": OmegaConf.to_container(ctx.model_cfg, resolve=True),
        "data": OmegaConf.to_container(ctx.data, resolve=True),
        "trainer": OmegaConf.to_container(ctx.cfg.trainer, resolve=True),
        "run_dir": str(ctx.run_dir),
        "starts_from": None if ctx.start_from is None else str(ctx.start_from),
        **sweep_job(),  # a multirun job: its overrides and number
    }


def stage_precision(ctx: StageContext, module, datamodule, train_examples: list) -> tuple[str | None, dict]:
    """The stage's training precision (``trainer.precision``; ``auto`` is decided once per stage, by device or
    by a probe of the module on a batch of the stage's, and kept in ``<stage>/precision.json``, so a resumed
    stage trains on in the precision it started with: :mod:`kdpipe.lightning.precision`)."""
    max_tokens = ctx.data.get("max_tokens") if ctx.data.get("packing") else None

    def batch() -> dict:  # from the pool the stage samples (all on-policy: the rollouts)
        pool = datamodule.encode_onpolicy() if getattr(datamodule, "onpolicy_lambda", 0) >= 1 else train_examples
        return probe_batch(datamodule.collator, pool, int(ctx.settings.batch_size), max_tokens)

    record = ctx.stage_dir / PRECISION_FILE
    precision, info = resolve_stage_precision(ctx.cfg.trainer, module, batch, record)
    if info:
        console.print(f"stage {ctx.spec.dirname}: {describe(precision, info)}")
    return precision, info


def export_and_evaluate(
    ctx: StageContext, trainer: L.Trainer, module, tokenizer, datamodule, seconds: float, precision_info: dict
) -> tuple[StageResult, dict]:
    """After ``fit``: the training metrics, then on rank 0 the export and the evaluation of the trained model;
    returns the stage's result (the evaluation's metrics included) and, apart, the evaluation's dict."""
    settings = ctx.settings
    whole = trained_model(ctx, trainer, module)  # every rank calls it (a gather, for a sharded strategy)
    evaluated = settings.eval.enabled and str(settings.eval.get("backend") or "kdpipe") != "lm_eval"
    skipped = datamodule.skipped_records(["train", "val", *([str(settings.eval.split)] if evaluated else [])])
    metrics = {
        "train_seconds": seconds,
        "steps": trainer.global_step,
        "train_examples": len(datamodule.encode_split("train")),  # cached: the split fit used
        "dropped_too_long": datamodule.dropped.get("train", 0),
        "truncated_too_long": getattr(datamodule, "truncated", {}).get("train", 0),
        "skipped_invalid": len(skipped["train"]),
        "skipped_invalid_by_split": {split: len(problems) for split, problems in skipped.items()},
        **{k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()},
        **module.throughput(),
        **peak_memory_mb(),
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        **precision_info,
    }
    # optimizer steps per second of training-step time (this process's steps; validation excluded)
    metrics["steps_per_s"] = metrics["batches_per_s"] / int(settings.accumulate_grad_batches)

    def on_rank_zero() -> tuple[StageResult, dict]:  # the others wait, then read the export
        write_skipped_records(ctx.stage_dir / "skipped_records.jsonl", skipped)  # every one, where and why
        trainable = count_parameters(whole, trainable_only=True)
        model = merged(whole)  # LoRA: the adapters merged in; the export and the evaluation use this model
        found = {"parameters": count_parameters(model), "trainable_parameters": trainable}
        export = export_model(model, tokenizer, ctx.stage_dir / "export")
        evaluation = evaluate_stage(ctx, model, tokenizer, model_dir=export) if settings.eval.enabled else {}
        return StageResult({**found, **evaluation}, export=export), evaluation

    result, evaluation = run_on_rank_zero(on_rank_zero)
    result.metrics = {**metrics, **result.metrics}
    return result, evaluation


def fit_stage(ctx: StageContext, module: SFTModule, tokenizer, datamodule: PostTrainDataModule) -> StageResult:
    """Fit ``module`` for the stage's steps (resuming from ``last.ckpt``), export it, evaluate it."""
    settings = ctx.settings
    max_steps = int(settings.max_steps)
    last = ctx.stage_dir / "checkpoints" / "last.ckpt"
    resume_from = str(last) if last.exists() else None
    if resume_from:
        console.print(f"[yellow]resuming stage {ctx.spec.dirname} from {last}")
    train_examples = datamodule.encode_split("train")
    precision, precision_info = stage_precision(ctx, module, datamodule, train_examples)
    # the loggers keep what an interrupted attempt logged before the step the stage resumes from
    resume_step = checkpoint_step(last) if resume_from else 0
    loggers = make_loggers(ctx.cfg.get("logger"), ctx.run_dir, ctx.stage_dir, ctx.spec.dirname, resume_step)
    trainer = make_trainer(ctx, max_steps, loggers, precision)
    if datamodule.scorer_model is not None and shards_weights(trainer.strategy):
        finish_loggers(loggers)
        raise PipelineConfigError(
            f"stage {ctx.spec.name!r}: curriculum.scorer=student_loss runs the model outside the training step, "
            "where a sharded strategy (FSDP) holds only a shard of it: use trainer=ddp, or another scorer"
        )
    L.seed_everything(ctx.seed, verbose=False)
    module.model.train()
    module.attempt_started = time.perf_counter()  # a resumed module adds the seconds before its checkpoint
    log_config(loggers, run_config(ctx))
    status = "failed"
    try:
        # our own checkpoints hold tensors and plain containers only: load them without unpickling code
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        if trainer.interrupted:
            raise KeyboardInterrupt(f"stage {ctx.spec.dirname} interrupted at step {trainer.global_step}")
        trainer.save_checkpoint(last, weights_only=False)  # full state: weights, optimizer, loops
        seconds = module.stage_seconds()  # this attempt's and, resumed, the interrupted ones' before it
        result, evaluation = export_and_evaluate(ctx, trainer, module, tokenizer, datamodule, seconds, precision_info)
        # what it scored, beside what it ran: the evaluation under eval/ (with a sample of its generations)
        log_results(loggers, result.metrics, trainer.global_step, evaluation, ctx.stage_dir / "generations.jsonl")
        status = "success"
    finally:
        finish_loggers(loggers, status)
    metrics = result.metrics
    console.print(
        f"stage {ctx.spec.dirname}: {metrics['steps']} steps in {seconds:.1f}s, {metrics['steps_per_s']:.3g} "
        f"steps/s ({metrics['tokens_per_s']:,.0f} tokens/s) in training steps"
        + (f" on {trainer.world_size} ranks (this rank's)" if trainer.world_size > 1 else "")
        + f", {metrics['trainable_parameters']:,} of {metrics['parameters']:,} parameters trained, "
        + ", ".join(f"{k} {v:,.0f}" for k, v in peak_memory_mb().items())
        + " (process peak so far)"
    )
    return result
