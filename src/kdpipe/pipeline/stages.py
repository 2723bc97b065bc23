"""What each stage kind does. A kind is a function ``(StageContext) -> (metrics, export_dir | None)``."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from kdpipe.data.datamodule import PostTrainDataModule
from kdpipe.data.sources import load_examples
from kdpipe.eval import evaluate_model
from kdpipe.models.factory import build_model, build_tokenizer, count_parameters, load_model, load_tokenizer
from kdpipe.modules import SFTModule
from kdpipe.pipeline.spec import StageSpec
from kdpipe.utils.io import atomic_replace_dir, atomic_write_json

console = Console()


@dataclass
class StageContext:
    """Everything a stage needs: the full config, its own settings and folder, and where its model starts."""

    cfg: DictConfig
    spec: StageSpec
    run_dir: Path
    stage_dir: Path
    start_from: Path | None  # export of the previous stage of the same model; None: build it fresh

    @property
    def settings(self) -> DictConfig:
        return self.spec.config

    @property
    def model_cfg(self) -> DictConfig:
        return self.cfg.models[self.spec.model]

    @property
    def seed(self) -> int:
        return int(self.cfg.seed) + self.spec.index


def load_model_and_tokenizer(ctx: StageContext):
    """The stage's starting model: the previous export of the same model, or a fresh one from its config."""
    trust = bool(ctx.model_cfg.get("trust_remote_code", False))
    if ctx.start_from is not None:
        return load_model(ctx.start_from, trust_remote_code=trust), load_tokenizer(ctx.start_from, trust)
    L.seed_everything(ctx.seed, verbose=False)
    tokenizer = build_tokenizer(ctx.model_cfg)
    return build_model(ctx.model_cfg, tokenizer), tokenizer


def export_model(model, tokenizer, export_dir: Path) -> Path:
    """``save_pretrained`` model and tokenizer into a temp folder, then move it into place."""
    tmp = export_dir.with_name(f".{export_dir.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_replace_dir(tmp, export_dir)
    return export_dir


def make_loggers(ctx: StageContext) -> list:
    """Instantiate the configured loggers for this stage (one wandb run per stage, grouped by run)."""
    loggers = []
    run_name = ctx.run_dir.name
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
                "id": f"{run_name}-{ctx.spec.dirname}".replace("/", "-"),
                "resume": "allow",
            }
        else:
            kwargs = {"save_dir": str(ctx.stage_dir), "name": "logs", "version": name}
        accepted = inspect.signature(factory.func).parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        loggers.append(factory(**{k: v for k, v in kwargs.items() if k in accepted or has_var_kw}))
    return loggers


def finish_loggers(loggers: list) -> None:
    """Close every logger; wandb runs are finished so the next stage (or multirun job) starts its own."""
    for logger in loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


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
    return hydra.utils.instantiate(
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
    )


def evaluate_stage(ctx: StageContext, model, tokenizer, style: str | None) -> dict:
    """Generation-based evaluation on ``settings.eval.split``; writes ``generations.jsonl``."""
    eval_cfg = ctx.settings.eval
    examples = load_examples(ctx.cfg.data, str(eval_cfg.split))
    if eval_cfg.get("limit"):
        examples = examples[: int(eval_cfg.limit)]
    device = torch.device("cuda" if torch.cuda.is_available() and ctx.cfg.trainer.accelerator != "cpu" else "cpu")
    model.to(device)
    metrics, records = evaluate_model(
        model,
        tokenizer,
        examples,
        style=style,
        batch_size=int(eval_cfg.batch_size),
        max_new_tokens=int(eval_cfg.max_new_tokens),
        description=f"eval {ctx.spec.name}",
    )
    with open(ctx.stage_dir / "generations.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return {**metrics, "eval_split": str(eval_cfg.split)}


def run_sft(ctx: StageContext) -> tuple[dict, Path]:
    """Supervised fine-tuning on one response style, then (optionally) evaluation of the result."""
    settings = ctx.settings
    model, tokenizer = load_model_and_tokenizer(ctx)
    max_steps = int(settings.max_steps)
    datamodule = PostTrainDataModule(
        tokenizer,
        data=ctx.cfg.data,
        style=str(settings.style),
        curriculum=settings.curriculum,
        batch_size=int(settings.batch_size),
        num_batches=max_steps * int(settings.accumulate_grad_batches),
        seed=ctx.seed,
        eval_batch_size=int(settings.eval.batch_size),
    )
    module = SFTModule(
        model,
        optimizer=hydra.utils.instantiate(settings.optimizer),
        scheduler=hydra.utils.instantiate(settings.scheduler) if settings.get("scheduler") else None,
        weight_decay=float(settings.weight_decay),
    )
    last = ctx.stage_dir / "checkpoints" / "last.ckpt"
    resume_from = str(last) if last.exists() else None
    if resume_from:
        console.print(f"[yellow]resuming stage {ctx.spec.dirname} from {last}")
    loggers = make_loggers(ctx)
    trainer = make_trainer(ctx, max_steps, loggers)
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
    metrics = {
        "train_seconds": time.perf_counter() - started,
        "steps": trainer.global_step,
        "parameters": count_parameters(module.model),
        "train_examples": len(datamodule.encode_split("train")),
        "dropped_too_long": datamodule.dropped.get("train", 0),
        **{k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()},
        **module.throughput(),
    }
    export = export_model(module.model, tokenizer, ctx.stage_dir / "export")
    if settings.eval.enabled:
        metrics.update(evaluate_stage(ctx, module.model, tokenizer, str(settings.style)))
    return metrics, export


def run_eval(ctx: StageContext) -> tuple[dict, None]:
    """Evaluate the model as the previous stage of it left it (a fresh model if none did)."""
    model, tokenizer = load_model_and_tokenizer(ctx)
    style = ctx.settings.get("style")
    metrics = evaluate_stage(ctx, model, tokenizer, str(style) if style else None)
    metrics["parameters"] = count_parameters(model)
    return metrics, None


STAGE_KINDS: dict[str, Callable[[StageContext], tuple[dict, Path | None]]] = {
    "sft": run_sft,
    "eval": run_eval,
}


def write_stage_metrics(ctx: StageContext, metrics: dict) -> None:
    payload = {"name": ctx.spec.name, "kind": ctx.spec.kind, "model": ctx.spec.model, "metrics": metrics}
    payload["settings"] = OmegaConf.to_container(ctx.settings, resolve=True)
    atomic_write_json(ctx.stage_dir / "metrics.json", payload)
