"""``score``: the teacher over each style's label sequences (or a rollout stage's set: ``sequences: rollouts``,
the stage named by ``rollouts_from`` or the one rollout stage of each style before it) into a store, through
:func:`kdpipe.engines.score_teacher` (a store with the same content is reused)."""

from __future__ import annotations

import time

from kdpipe.data.datamodule import encode_examples
from kdpipe.data.rollouts import load_rollouts
from kdpipe.data.sources import load_examples
from kdpipe.engines import score_with
from kdpipe.engines.vllm_engine import VllmEngine, VllmSettings
from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.strategy import wrapped_in_place
from kdpipe.pipeline.result import SEQUENCES, StageResult, StoreRef
from kdpipe.pipeline.spec import score_slots
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.weights import inference_checkpoint, load_model_and_tokenizer
from kdpipe.store.reader import TeacherStore
from kdpipe.utils.dist import rank_zero_console

console = rank_zero_console()


def run_score(ctx: StageContext) -> StageResult:
    settings = ctx.settings
    k, temperature, sequences = int(settings.k), float(settings.temperature), str(settings.sequences)
    engine = str(settings.get("engine") or "hf")
    if engine == "vllm":  # vLLM loads the checkpoint folder itself: no Hugging Face copy of the weights here
        model_dir, tokenizer = inference_checkpoint(ctx)
        model = VllmEngine(model_dir, VllmSettings.from_config(settings.get("vllm")), k)
    else:
        model, tokenizer = load_model_and_tokenizer(ctx)
        if ctx.start_from is None and ctx.model_cfg.source == "config":
            console.print(f"[yellow]warning: scoring an untrained {ctx.spec.model!r} (no earlier stage trained it)")
    if sequences not in SEQUENCES:
        raise PipelineConfigError(f"pipeline.stages.{ctx.spec.name}.sequences={sequences!r}: labels | rollouts")
    if not 1 <= k <= len(tokenizer):
        raise PipelineConfigError(f"pipeline.stages.{ctx.spec.name}.k={k} must be in [1, vocab size {len(tokenizer)}]")
    result = StageResult({})
    for style, _, source in score_slots(*ctx.located()):
        if source is not None:  # a rollout stage's responses: on-policy KD, or sequence-level KD data
            raw, split = load_rollouts(ctx.rollout_set(source)), "rollouts"
        else:
            raw, split = load_examples(ctx.data, str(settings.split)), str(settings.split)
        examples, _ = encode_examples(tokenizer, ctx.data, raw, [style])
        if not examples:
            raise PipelineConfigError(f"stage {ctx.spec.name!r}: nothing to score for style {style!r} ({sequences})")
        started, reused = time.perf_counter(), []
        common = {
            "style": style,
            "split": split,
            "store_root": str(settings.store_root),
            "k": k,
            "temperature": temperature,
            "batch_size": int(settings.batch_size),
            "shard_size": int(settings.shard_size),
            "on_reuse": lambda reused=reused: reused.append(True),
            "verify": str(ctx.cfg.get("store_verify") or "full"),
        }
        path = score_with(
            model,
            tokenizer,
            examples,
            chunk_size=int(settings.chunk_size),
            precision=settings.get("precision"),
            trainer=ctx.cfg.trainer,
            **common,
        )
        if engine == "hf" and wrapped_in_place(model):  # FSDP wrapped its layers: the next style starts afresh
            model, _ = load_model_and_tokenizer(ctx)
        store = TeacherStore(path)
        nbytes, rows = store.nbytes, store.num_rows
        result.stores.append(StoreRef(style, sequences, path, source))
        result.metrics[f"{style}_{'rollout_' if sequences == 'rollouts' else ''}store"] = {
            "name": path.name,
            **({"rollouts_from": source} if source is not None else {}),
            "reused": bool(reused),
            "examples": len(examples),
            "label_tokens": rows,
            "bytes": nbytes,
            "bytes_per_token": nbytes / max(rows, 1),
            "bytes_per_entry": nbytes / max(rows * k, 1),
            "engine": engine,
            "seconds": time.perf_counter() - started,
        }
    return result
