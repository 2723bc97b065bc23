"""What each stage kind does. A kind is a function ``(StageContext) -> (metrics, export_dir | None)``."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from omegaconf import DictConfig, OmegaConf

from kdpipe.accelerators import NPUUnavailableError, npu_device, require_npu
from kdpipe.accelerators import register as register_accelerators
from kdpipe.data.datamodule import PostTrainDataModule, encode_examples
from kdpipe.data.encode import system_prompt_for
from kdpipe.data.rollouts import RolloutSettings, load_rollouts, write_rollouts
from kdpipe.data.scorers import needs_model, needs_store, scorer_config
from kdpipe.data.sources import load_examples
from kdpipe.eval import evaluate_model
from kdpipe.models.factory import (
    build_model,
    build_tokenizer,
    count_parameters,
    load_model,
    load_options,
    load_tokenizer,
)
from kdpipe.models.lora import maybe_apply_lora, merged
from kdpipe.modules import KDModule, SFTModule
from kdpipe.modules.scorer import TeacherScorer
from kdpipe.pipeline.launch import shards_weights
from kdpipe.pipeline.sharing import claimed
from kdpipe.pipeline.spec import PipelineConfigError, StageSpec
from kdpipe.store import codec
from kdpipe.store.callback import ScoreDataModule, StoreWriterCallback
from kdpipe.store.fingerprint import data_fingerprint, model_fingerprint, tokenizer_fingerprint
from kdpipe.store.reader import TeacherStore
from kdpipe.store.writer import MANIFEST, StoreWriter
from kdpipe.utils.dist import is_rank_zero, rank_zero_console, run_on_rank_zero
from kdpipe.utils.io import atomic_replace_dir, atomic_write_json
from kdpipe.utils.memory import peak_memory_mb

console = rank_zero_console()


@dataclass
class StageContext:
    """Everything a stage needs: the full config, its own settings and folder, and where its model starts."""

    cfg: DictConfig
    spec: StageSpec
    run_dir: Path
    stage_dir: Path
    start_from: Path | None  # export of the previous stage of the same model; None: build it fresh
    stores: dict[str, str] = field(default_factory=dict)  # style (or "<style>:rollouts") -> latest teacher store
    rollouts: dict[str, str] = field(default_factory=dict)  # style -> latest rollout set of the student

    @property
    def settings(self) -> DictConfig:
        return self.spec.config

    @property
    def model_cfg(self) -> DictConfig:
        return self.cfg.models[self.spec.model]

    @property
    def seed(self) -> int:
        """The stage's seed: ``settings.seed`` when pinned, else the run's seed plus the stage's index."""
        pinned = self.settings.get("seed")
        return int(pinned) if pinned is not None else int(self.cfg.seed) + self.spec.index


def converted_root(cfg: DictConfig) -> Path:
    """Where GGUF models are converted into plain checkpoints (shared by runs, like the stores)."""
    return Path(str(cfg.paths.log_dir)).expanduser().resolve() / "converted"


def load_model_and_tokenizer(ctx: StageContext):
    """The stage's starting model: the previous export of the same model, or a fresh one from its config.

    The model config's ``dtype``, ``attn_implementation`` and ``trust_remote_code`` apply to both."""
    options = load_options(ctx.model_cfg)
    if ctx.start_from is not None:
        tokenizer = load_tokenizer(ctx.start_from, options["trust_remote_code"])
        return load_model(ctx.start_from, **options), tokenizer
    L.seed_everything(ctx.seed, verbose=False)
    tokenizer = build_tokenizer(ctx.model_cfg, converted_root(ctx.cfg))
    return build_model(ctx.model_cfg, tokenizer, converted_root(ctx.cfg)), tokenizer


def load_trainable(ctx: StageContext):
    """The starting model of a training stage, wrapped in LoRA adapters when its config enables them."""
    model, tokenizer = load_model_and_tokenizer(ctx)
    return maybe_apply_lora(model, ctx.model_cfg.get("lora")), tokenizer


def export_model(model, tokenizer, export_dir: Path) -> Path:
    """``save_pretrained`` model and tokenizer into a temp folder, then move it into place. A LoRA (PEFT)
    model is merged first (in place), so the export is a plain checkpoint any ``transformers`` loads."""
    tmp = export_dir.with_name(f".{export_dir.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    merged(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_replace_dir(tmp, export_dir)
    return export_dir


def make_loggers(ctx: StageContext) -> list:
    """Instantiate the configured loggers for this stage (one wandb run per stage, grouped by run)."""
    loggers = []
    # multirun jobs are numbered folders: name runs by their last two path parts, id them by the full path
    run_name = "/".join(ctx.run_dir.parts[-2:]) if ctx.run_dir.name.isdigit() else ctx.run_dir.name
    run_id = hashlib.sha1(str(ctx.run_dir).encode()).hexdigest()[:10]
    for name, logger_cfg in (ctx.cfg.get("logger") or {}).items():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        factory = hydra.utils.instantiate(logger_cfg, _partial_=True)
        target = str(logger_cfg._target_)
        if "Wandb" in target:
            kwargs = {
                "save_dir": str(ctx.run_dir),
                "name": f"{run_name}/{ctx.spec.dirname}",
                "group": run_name,
                "id": f"{run_id}-{ctx.spec.dirname}",  # stable: a resumed stage continues its wandb run
                "resume": "allow",
            }
        else:
            kwargs = {"save_dir": str(ctx.stage_dir), "name": "logs", "version": name}
        accepted = inspect.signature(factory.func).parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        logger = factory(**{k: v for k, v in kwargs.items() if k in accepted or has_var_kw})
        if "Wandb" in target:  # what finish_loggers puts back (see there)
            logger.kdpipe_prior_wandb_mode = os.environ.get("WANDB_MODE")
        loggers.append(logger)
    return loggers


def finish_loggers(loggers: list) -> None:
    """Close every logger; wandb runs are finished so the next stage (or multirun job) starts its own.

    ``WandbLogger(offline=True)`` sets ``WANDB_MODE`` for the rest of the process, and wandb keeps the settings
    of its first run in a process-wide singleton: under Hydra's basic launcher every multirun job runs in the
    same process, so a later stage or job would silently get the first one's mode. The stage puts
    ``WANDB_MODE`` back as it found it and tears wandb down, so the next run reads its own settings afresh."""
    for logger in loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
            if hasattr(logger, "kdpipe_prior_wandb_mode"):
                prior = logger.kdpipe_prior_wandb_mode
                if prior is None:
                    os.environ.pop("WANDB_MODE", None)
                else:
                    os.environ["WANDB_MODE"] = prior
            wandb.teardown()


MIXED_PRECISION = {"bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed", "16-mixed": "16-mixed", "16": "16-mixed"}


def check_trainer_device(trainer_cfg: DictConfig) -> None:
    """Fail early, before any stage runs, when the trainer asks for an NPU that cannot be used here (the message
    says what to install or to source) or asks for one without the settings Lightning does not infer."""
    if str(trainer_cfg.get("accelerator")) != "npu":
        return
    try:
        require_npu()
    except NPUUnavailableError as err:
        raise PipelineConfigError(f"trainer.accelerator=npu: {err}") from err
    if trainer_cfg.get("strategy") in (None, "auto"):
        raise PipelineConfigError(
            "trainer.accelerator=npu needs an explicit strategy (for a custom accelerator Lightning falls back to a "
            "CPU single-device strategy, or gloo DDP): use trainer=npu (one NPU) or trainer=npu_ddp (HCCL)"
        )


def instantiate_trainer(trainer_cfg: DictConfig, **overrides) -> L.Trainer:
    """``lightning.Trainer`` from a trainer config plus keyword overrides; registers kdpipe's accelerators.

    Nested ``_target_`` nodes (the strategy and precision plugin the NPU configs give) are instantiated too. A
    ``precision`` (from the config or the overrides, e.g. a score stage's ``32-true``) replaces a precision plugin
    the config gives; mixed precision keeps the plugin's autocast device (for the NPU, ``npu``: Lightning would
    pick CUDA autocast for a custom accelerator).
    """
    register_accelerators()
    check_trainer_device(trainer_cfg)
    factory = hydra.utils.instantiate(trainer_cfg, _partial_=True)
    settings = {**factory.keywords, **overrides}
    plugins = list(settings.get("plugins") or [])
    precision = settings.get("precision")
    given = [p for p in plugins if isinstance(p, Precision)]
    autocast = next((p.device for p in given if isinstance(p, MixedPrecision)), None)
    if autocast is None and str(settings.get("accelerator")) == "npu":
        autocast = "npu"
    if precision is not None and (given or autocast is not None):
        plugins = [p for p in plugins if not isinstance(p, Precision)]
        if str(precision) in MIXED_PRECISION and autocast is not None:
            plugins.append(MixedPrecision(MIXED_PRECISION[str(precision)], device=autocast))
            precision = None
    return factory(**{**overrides, "plugins": plugins or None, "precision": precision})


def inference_device(trainer_cfg: DictConfig) -> torch.device:
    """Where generation (eval, rollouts) runs: the trainer's NPU, else CUDA when available and not ``cpu``."""
    if str(trainer_cfg.get("accelerator")) == "npu":
        index = OmegaConf.select(trainer_cfg, "strategy.device.index", default=None)
        return npu_device(None if index is None else int(index))
    return torch.device("cuda" if torch.cuda.is_available() and trainer_cfg.accelerator != "cpu" else "cpu")


def make_trainer(ctx: StageContext, max_steps: int, loggers: list) -> L.Trainer:
    settings = ctx.settings
    callbacks = [hydra.utils.instantiate(c) for c in (ctx.cfg.get("callbacks") or {}).values() if c is not None]
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
    )


def stage_styles(settings: DictConfig) -> list[str]:
    style = settings.get("style")
    return [str(style)] if isinstance(style, str) else [str(s) for s in style]


def evaluate_stage(ctx: StageContext, model, tokenizer) -> dict:
    """Generation-based evaluation on ``settings.eval.split``, prompted in ``eval.style`` (default: the
    stage's first style); writes ``generations.jsonl``."""
    eval_cfg = ctx.settings.eval
    style = str(eval_cfg.get("style") or stage_styles(ctx.settings)[0])
    examples = load_examples(ctx.cfg.data, str(eval_cfg.split))
    if eval_cfg.get("limit"):
        examples = examples[: int(eval_cfg.limit)]
    model.to(inference_device(ctx.cfg.trainer))
    metrics, records = evaluate_model(
        model,
        tokenizer,
        examples,
        style=style,
        system_prompt=system_prompt_for(ctx.cfg.data, style),
        batch_size=int(eval_cfg.batch_size),
        max_new_tokens=int(eval_cfg.max_new_tokens),
        description=f"eval {ctx.spec.name}",
    )
    with open(ctx.stage_dir / "generations.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return {**metrics, "eval_split": str(eval_cfg.split)}


def make_datamodule(ctx: StageContext, tokenizer, store=None, model=None, onpolicy=None) -> PostTrainDataModule:
    """The stage's DataModule; ``model`` is what a ``student_loss`` curriculum scores with; ``onpolicy`` is
    ``(rollout records, their store, lambda)`` for a KD stage that mixes in the student's own responses."""
    settings = ctx.settings
    scorer_store = None
    if store is None and onpolicy is None and needs_store(settings.curriculum):  # e.g. SFT ordered by teacher_nll
        style = stage_styles(settings)[0]
        if style not in ctx.stores:
            raise PipelineConfigError(
                f"stage {ctx.spec.name!r}: curriculum.scorer={scorer_config(settings.curriculum)['name']} reads "
                f"the teacher store of style {style!r}: put a `score` stage before it"
            )
        scorer_store = TeacherStore(ctx.stores[style])
    return PostTrainDataModule(
        tokenizer,
        data=ctx.cfg.data,
        style=stage_styles(settings),
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
        **(dict(zip(("onpolicy_examples", "onpolicy_store", "onpolicy_lambda"), onpolicy)) if onpolicy else {}),
    )


def train_stage(ctx: StageContext, module: SFTModule, tokenizer, datamodule: PostTrainDataModule) -> tuple[dict, Path]:
    """Fit ``module`` for the stage's steps (resuming from ``last.ckpt``), export it, evaluate it."""
    settings = ctx.settings
    max_steps = int(settings.max_steps)
    last = ctx.stage_dir / "checkpoints" / "last.ckpt"
    resume_from = str(last) if last.exists() else None
    if resume_from:
        console.print(f"[yellow]resuming stage {ctx.spec.dirname} from {last}")
    loggers = make_loggers(ctx)
    trainer = make_trainer(ctx, max_steps, loggers)
    if datamodule.scorer_model is not None and shards_weights(trainer.strategy):
        finish_loggers(loggers)
        raise PipelineConfigError(
            f"stage {ctx.spec.name!r}: curriculum.scorer=student_loss runs the model outside the training step, "
            "where a sharded strategy (FSDP) holds only a shard of it: use trainer=ddp, or another scorer"
        )
    L.seed_everything(ctx.seed, verbose=False)
    module.model.train()
    started = time.perf_counter()
    try:
        # our own checkpoints hold tensors and plain containers only: load them without unpickling code
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        if trainer.interrupted:
            raise KeyboardInterrupt(f"stage {ctx.spec.dirname} interrupted at step {trainer.global_step}")
        trainer.save_checkpoint(last, weights_only=False)  # full state: weights, optimizer, loops
    finally:
        finish_loggers(loggers)
    seconds = time.perf_counter() - started
    whole = trained_model(ctx, trainer, module)  # every rank calls it (a gather, for a sharded strategy)
    metrics = {
        "train_seconds": seconds,
        "steps": trainer.global_step,
        "train_examples": len(datamodule.encode_split("train")),
        "dropped_too_long": datamodule.dropped.get("train", 0),
        "truncated_too_long": getattr(datamodule, "truncated", {}).get("train", 0),
        "skipped_invalid": getattr(datamodule, "skipped_invalid", {}).get("train", 0),
        **{k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()},
        **module.throughput(),
        **peak_memory_mb(),
        "world_size": trainer.world_size,
    }
    # optimizer steps per second of training-step time (this process's steps; validation excluded)
    metrics["steps_per_s"] = metrics["batches_per_s"] / int(settings.accumulate_grad_batches)

    def export_and_evaluate() -> tuple[dict, Path]:  # rank 0: the others wait, then read the export
        trainable = count_parameters(whole, trainable_only=True)
        model = merged(whole)  # LoRA: the adapters merged in; the export and the evaluation use this model
        found = {"parameters": count_parameters(model), "trainable_parameters": trainable}
        export = export_model(model, tokenizer, ctx.stage_dir / "export")
        if settings.eval.enabled:
            found.update(evaluate_stage(ctx, model, tokenizer))
        return found, export

    found, export = run_on_rank_zero(export_and_evaluate)
    metrics.update(found)
    console.print(
        f"stage {ctx.spec.dirname}: {metrics['steps']} steps in {seconds:.1f}s, {metrics['steps_per_s']:.3g} "
        f"steps/s ({metrics['tokens_per_s']:,.0f} tokens/s) in training steps"
        + (f" on {trainer.world_size} ranks (this rank's)" if trainer.world_size > 1 else "")
        + f", {metrics['trainable_parameters']:,} of {metrics['parameters']:,} parameters trained, "
        + ", ".join(f"{k} {v:,.0f}" for k, v in peak_memory_mb().items())
        + " (process peak so far)"
    )
    return metrics, export


def trained_model(ctx: StageContext, trainer: L.Trainer, module: SFTModule):
    """The trained model whole on rank 0 (None elsewhere under a sharded strategy).

    Under one process, DDP or DeepSpeed ZeRO 1/2 every rank holds the whole model: the module's own. Under
    FSDP each rank holds a shard: the full state dict is gathered onto rank 0 (a collective: every rank calls
    this; ``state_dict_type: full``) and loaded into a fresh copy of the stage's starting model."""
    if not shards_weights(trainer.strategy):
        return module.model
    state = trainer.strategy.lightning_module_state_dict()
    if not is_rank_zero():
        return None
    fresh, _ = load_trainable(ctx)
    prefix = "model."
    fresh.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return fresh


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


def run_sft(ctx: StageContext) -> tuple[dict, Path]:
    """Supervised fine-tuning on one response style, then (optionally) evaluation of the result."""
    model, tokenizer = load_trainable(ctx)
    module = SFTModule(model, **optimizer_parts(ctx.settings))
    return train_stage(ctx, module, tokenizer, make_datamodule(ctx, tokenizer, model=model))


def onpolicy_key(style: str) -> str:
    """The ``stores`` key of the teacher's signal on the student's rollouts of ``style``."""
    return f"{style}:rollouts"


def resolve_store_path(ctx: StageContext, setting: str = "store", onpolicy: bool = False) -> Path:
    """The store a KD stage reads: ``auto`` is the latest one scored for its style (on its label sequences,
    or with ``onpolicy`` on the student's rollouts)."""
    store = ctx.settings.get(setting)
    if store in (None, "auto"):
        styles = stage_styles(ctx.settings)
        if len(styles) != 1:
            raise PipelineConfigError(f"kd stage {ctx.spec.name!r} needs one style (a store covers one); got {styles}")
        style = styles[0]
        key = onpolicy_key(style) if onpolicy else style
        if key not in ctx.stores:
            what = "rollout" if onpolicy else "label"
            fix = "a `rollout` stage, then a `score` stage with sequences: rollouts," if onpolicy else "a `score` stage"
            raise PipelineConfigError(
                f"stage {ctx.spec.name!r} (kd, style={style!r}) has no teacher store of its {what} sequences: put "
                f"{fix} scoring style {style!r} before it, or set pipeline.stages.{ctx.spec.name}.{setting}=<path>"
            )
        return Path(ctx.stores[key])
    return Path(str(store))


def resolve_rollouts(ctx: StageContext, style: str) -> Path:
    """The latest rollout set of ``style`` (written by an earlier ``rollout`` stage of this run)."""
    if style not in ctx.rollouts:
        raise PipelineConfigError(
            f"stage {ctx.spec.name!r} uses the student's rollouts of style {style!r}, but no `rollout` stage "
            f"sampled that style earlier in pipeline.order"
        )
    return Path(ctx.rollouts[style])


def run_kd(ctx: StageContext) -> tuple[dict, Path]:
    """Distillation from the stored teacher signal (plus CE), then (optionally) evaluation.

    ``onpolicy_lambda`` > 0 mixes in the student's own responses (a rollout set scored by the teacher):
    that share of every batch is on-policy, the rest label-conditioned."""
    ratio = float(ctx.settings.onpolicy_lambda)
    if not 0.0 <= ratio <= 1.0:
        raise PipelineConfigError(f"pipeline.stages.{ctx.spec.name}.onpolicy_lambda={ratio} must be in [0, 1]")
    store = TeacherStore(resolve_store_path(ctx)) if ratio < 1 else None
    onpolicy_store, onpolicy_examples = None, None
    if ratio > 0:
        onpolicy_store = TeacherStore(resolve_store_path(ctx, "onpolicy_store", onpolicy=True))
        onpolicy_examples = load_rollouts(resolve_rollouts(ctx, stage_styles(ctx.settings)[0]))
    model, tokenizer = load_trainable(ctx)
    loss = OmegaConf.to_container(ctx.settings.loss, resolve=True)
    module = KDModule(model, loss=loss, **optimizer_parts(ctx.settings))
    datamodule = make_datamodule(
        ctx,
        tokenizer,
        store=store,
        model=module.model,
        onpolicy=(onpolicy_examples, onpolicy_store, ratio) if ratio > 0 else None,
    )
    metrics, export = train_stage(ctx, module, tokenizer, datamodule)
    metrics["store"] = str(store.path) if store is not None else None
    if onpolicy_store is not None:
        metrics.update(onpolicy_store=str(onpolicy_store.path), onpolicy_examples=len(datamodule.encode_onpolicy()))
    return metrics, export


def run_rollout(ctx: StageContext) -> tuple[dict, None]:
    """The current model samples ``n_samples`` responses per prompt into ``<stage>/rollouts`` (resumable)."""
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
    )
    samples = max(int(manifest["samples"]), 1)
    return {
        "rollouts": {style: str(root.resolve())},
        "prompts": manifest["prompts"],
        "samples": manifest["samples"],
        "kept": manifest["kept"],
        "truncated_fraction": manifest["truncated"] / samples,
        "sample_accuracy": 1 - manifest["incorrect"] / samples,
        "seconds": time.perf_counter() - started,
    }, None


def run_score(ctx: StageContext) -> tuple[dict, None]:
    """Score the teacher over each style's label sequences into a store (reusing a matching one)."""
    settings = ctx.settings
    model, tokenizer = load_model_and_tokenizer(ctx)
    if ctx.start_from is None and ctx.model_cfg.source == "config":
        console.print(f"[yellow]warning: scoring an untrained {ctx.spec.model!r} (no earlier stage trained it)")
    k, temperature = int(settings.k), float(settings.temperature)
    if not 1 <= k <= len(tokenizer):
        raise PipelineConfigError(f"pipeline.stages.{ctx.spec.name}.k={k} must be in [1, vocab size {len(tokenizer)}]")
    teacher_fp, tokenizer_fp = model_fingerprint(model), tokenizer_fingerprint(tokenizer)
    sequences = str(settings.sequences)
    if sequences not in ("labels", "rollouts"):
        raise PipelineConfigError(f"pipeline.stages.{ctx.spec.name}.sequences={sequences!r}: labels | rollouts")
    metrics: dict = {"stores": {}}
    for style in settings.styles:
        style = str(style)
        if sequences == "rollouts":  # the student's own responses: on-policy distillation
            raw, split = load_rollouts(resolve_rollouts(ctx, style)), "rollouts"
        else:
            raw, split = load_examples(ctx.cfg.data, str(settings.split)), str(settings.split)
        examples, _ = encode_examples(tokenizer, ctx.cfg.data, raw, [style])
        if not examples:
            raise PipelineConfigError(f"stage {ctx.spec.name!r}: nothing to score for style {style!r} ({sequences})")
        meta = {
            "teacher": teacher_fp,
            "tokenizer": tokenizer_fp,
            "data": {**data_fingerprint(examples), "split": split, "style": style},
            "k": k,
            "temperature": temperature,
        }
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(str(settings.store_root)).expanduser().resolve() / f"{style}-{split}-k{k}-{key}"
        started = time.perf_counter()
        # rank 0 decides for all; a concurrent job scoring the same store holds its lock: wait, then reuse it
        with claimed(path, lambda path=path: True if (path / MANIFEST).exists() else None) as found:
            reused = found is not None
            if reused:
                console.print(f"reusing teacher store {path}")
            else:
                write_store(ctx, model, path, examples, meta, codec.make_spec(len(tokenizer), k))
                if wrapped_in_place(model):  # FSDP wrapped its layers for this predict: the next style starts afresh
                    model, _ = load_model_and_tokenizer(ctx)
        store = TeacherStore(path)
        store.check_compatible(tokenizer, examples)
        nbytes = sum((path / sh["file"]).stat().st_size for sh in store.manifest["shards"])
        rows = int(store.manifest["total_rows"])
        store_key = onpolicy_key(style) if sequences == "rollouts" else style
        metrics["stores"][store_key] = str(path)
        metrics[f"{style}_{'rollout_' if sequences == 'rollouts' else ''}store"] = {
            "path": str(path),
            "reused": reused,
            "examples": len(examples),
            "label_tokens": rows,
            "bytes": nbytes,
            "bytes_per_token": nbytes / max(rows, 1),
            "bytes_per_entry": nbytes / max(rows * k, 1),
            "seconds": time.perf_counter() - started,
        }
    return metrics, None


def wrapped_in_place(model: torch.nn.Module) -> bool:
    """Whether a strategy replaced some of the model's modules by its own wrappers (FSDP units)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def write_store(ctx: StageContext, model, path: Path, examples, meta: dict, spec) -> None:
    """Score the examples not yet in complete shards with ``Trainer.predict``; rank 0 writes the manifest."""
    settings = ctx.settings

    def make_writer(rank: int, world_size: int) -> StoreWriter:
        return StoreWriter(path, examples, meta, spec, int(settings.shard_size), rank, world_size)

    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    data = ScoreDataModule(examples, make_writer, int(settings.batch_size), pad_id)
    scorer = TeacherScorer(model, int(settings.k), float(settings.temperature), int(settings.chunk_size))
    trainer = instantiate_trainer(
        ctx.cfg.trainer,
        callbacks=[StoreWriterCallback(data)],
        logger=False,
        default_root_dir=str(ctx.stage_dir),
        use_distributed_sampler=False,  # each rank scores its own shards
        **({"precision": settings.precision} if settings.get("precision") else {}),
    )
    data.equal_batches = shards_weights(trainer.strategy)  # FSDP: every forward is a collective
    console.print(f"scoring {len(examples)} examples into {path} (complete shards are kept)")
    trainer.predict(scorer, datamodule=data, return_predictions=False)
    trainer.strategy.barrier()  # every rank's shards are on disk
    run_on_rank_zero(lambda: make_writer(0, 1).finalize())  # one manifest over them; the others wait for it


def run_eval(ctx: StageContext) -> tuple[dict, None]:
    """Evaluate the model as the previous stage of it left it (a fresh model if none did)."""
    model, tokenizer = load_model_and_tokenizer(ctx)
    metrics = evaluate_stage(ctx, model, tokenizer)
    metrics["parameters"] = count_parameters(model)
    return metrics, None


STAGE_KINDS: dict[str, Callable[[StageContext], tuple[dict, Path | None]]] = {
    "sft": run_sft,
    "eval": run_eval,
    "score": run_score,
    "kd": run_kd,
    "rollout": run_rollout,
}


def write_stage_metrics(ctx: StageContext, metrics: dict) -> None:
    """The stage's ``metrics.json`` (global rank 0 only)."""
    if not is_rank_zero():
        return
    payload = {"name": ctx.spec.name, "kind": ctx.spec.kind, "model": ctx.spec.model, "metrics": metrics}
    payload["settings"] = OmegaConf.to_container(ctx.settings, resolve=True)
    atomic_write_json(ctx.stage_dir / "metrics.json", payload)
