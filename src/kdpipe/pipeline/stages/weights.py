"""A stage's model: where it starts (the previous export of the same model, or built from its config), how
it is exported, and how it is gathered whole after a sharded fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.strategy import shards_weights
from kdpipe.models.factory import (
    build_model,
    build_tokenizer,
    load_model,
    load_options,
    load_tokenizer,
    pretrained_dir,
)
from kdpipe.models.lora import maybe_apply_lora, merged
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.utils.dist import is_rank_zero
from kdpipe.utils.io import atomic_dir


def converted_root(ctx: StageContext) -> Path:
    """Where GGUF models are converted into plain checkpoints (shared by runs, like the stores)."""
    return Path(str(ctx.cfg.paths.log_dir)).expanduser().resolve() / "converted"


def load_model_and_tokenizer(ctx: StageContext):
    """The stage's starting model: the previous export of the same model, or a fresh one from its config.

    The model config's ``dtype``, ``attn_implementation`` and ``trust_remote_code`` apply to both."""
    options = load_options(ctx.model_cfg)
    if ctx.start_from is not None:
        tokenizer = load_tokenizer(ctx.start_from, options["trust_remote_code"])
        return load_model(ctx.start_from, **options), tokenizer
    L.seed_everything(ctx.seed, verbose=False)
    tokenizer = build_tokenizer(ctx.model_cfg, converted_root(ctx))
    return build_model(ctx.model_cfg, tokenizer, converted_root(ctx)), tokenizer


def inference_checkpoint(ctx: StageContext):
    """The stage's model as a checkpoint folder and its tokenizer, for an engine that loads the folder itself
    (``engine: vllm``): the previous export of the same model, else its pretrained (or converted GGUF) path."""
    options = load_options(ctx.model_cfg)
    if ctx.start_from is not None:
        return Path(ctx.start_from), load_tokenizer(ctx.start_from, options["trust_remote_code"])
    if ctx.model_cfg.get("source") != "pretrained":
        raise PipelineConfigError(
            f"stage {ctx.spec.name!r}: engine: vllm loads a checkpoint, but model {ctx.spec.model!r} is built "
            "from its config (source: config) and no earlier stage trained it: train it first, or use engine: hf"
        )
    directory = Path(pretrained_dir(ctx.model_cfg, converted_root(ctx)))
    if not directory.is_dir():  # a hub id: its snapshot in the Hugging Face cache (downloaded once)
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(str(directory)))
    return directory, build_tokenizer(ctx.model_cfg, converted_root(ctx))


def load_trainable(ctx: StageContext):
    """The starting model of a training stage, wrapped in LoRA adapters when its config enables them."""
    model, tokenizer = load_model_and_tokenizer(ctx)
    return maybe_apply_lora(model, ctx.model_cfg.get("lora")), tokenizer


def export_model(model, tokenizer, export_dir: Path) -> Path:
    """``save_pretrained`` model and tokenizer into a temp folder, then move it into place. A LoRA (PEFT)
    model is merged first (in place), so the export is a plain checkpoint any ``transformers`` loads."""
    with atomic_dir(export_dir) as tmp:
        merged(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return export_dir


def trained_model(ctx: StageContext, trainer: L.Trainer, module):
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
