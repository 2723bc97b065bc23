"""Teacher scoring as a library function: a teacher over encoded examples into a content-addressed store.

The store's name is derived from everything that determines its content (teacher and tokenizer fingerprints,
the data, k, temperature), so any caller scoring the same inputs (a pipeline's ``score`` stage,
``kdpipe-score``, a notebook) finds and reuses it. Concurrent callers wait on a lock beside the store while
the first one writes it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpipe.engines.predict_writer import ScoreDataModule, StoreWriterCallback
from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.strategy import shards_weights
from kdpipe.lightning.trainer import instantiate_trainer
from kdpipe.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from kdpipe.modules.scorer import TeacherScorer
from kdpipe.store import codec
from kdpipe.store.fingerprint import data_fingerprint
from kdpipe.store.reader import StoreError, TeacherStore
from kdpipe.store.writer import MANIFEST, StoreWriter
from kdpipe.types import EncodedExample
from kdpipe.utils.claim import claimed
from kdpipe.utils.dist import barrier, global_rank, rank_zero_console, run_on_rank_zero, world_size

console = rank_zero_console()
CPU_TRAINER = {"_target_": "lightning.Trainer", "accelerator": "auto", "devices": 1, "enable_model_summary": False}


def store_meta(
    teacher: dict,
    tokenizer,
    examples: list[EncodedExample],
    style: str,
    split: str,
    k: int,
    temperature: float,
    engine: dict | None = None,
):
    """What determines a store's content (recorded in its manifest and hashed into its name). ``teacher``: its
    fingerprint (:func:`~kdpipe.models.fingerprint.model_fingerprint`); ``engine``: the inference engine when
    it is not the Hugging Face path (absent for HF stores, whose names therefore stay what they were)."""
    meta = {
        "teacher": teacher,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": {**data_fingerprint(examples), "split": split, "style": style},
        "k": k,
        "temperature": temperature,
    }
    if engine is not None:
        meta["engine"] = engine
    return meta


def store_path(store_root: str | Path, meta: dict) -> Path:
    """``<store_root>/<style>-<split>-k<k>-<hash of meta>``."""
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    data = meta["data"]
    return Path(store_root).expanduser().resolve() / f"{data['style']}-{data['split']}-k{meta['k']}-{key}"


def reusable(path: Path, verify: str = "full") -> bool | None:
    """True if a finished, intact store is at ``path``; None if there is none. A broken one (a truncated
    manifest, a missing or altered shard) is renamed to ``<name>.broken-<time>`` with a ``BROKEN.txt`` saying
    why, so it is scored again and nothing is lost."""
    if not (path / MANIFEST).exists():
        return None
    try:
        store = TeacherStore(path)
        if verify == "full":
            store.verify_all()
        return True
    except (StoreError, OSError, ValueError, KeyError) as err:
        aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        (aside / "BROKEN.txt").write_text(f"set aside by kdpipe: {err}\n")
        console.print(f"[yellow]teacher store {path} is broken ({err}): set aside as {aside}, scoring it again")
        return None


def score_teacher(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[EncodedExample],
    *,
    style: str,
    split: str,
    store_root: str | Path,
    k: int = 16,
    temperature: float = 1.0,
    batch_size: int = 64,
    shard_size: int = 2048,
    chunk_size: int = 4096,
    precision: str | None = "32-true",
    trainer: DictConfig | dict | None = None,
    on_reuse: Callable[[], None] | None = None,
    verify: str = "full",
) -> Path:
    """Score ``examples`` (encoded in ``style``) with the teacher into a store and return its path; a complete
    store with the same content is reused (``on_reuse`` is called then: also when another job finished it while
    this one waited for it), an interrupted one is finished (complete shards are kept).

    Args:
        k, temperature: top-k entries stored per label position, and the teacher's softmax temperature.
        split: the name of what was scored (``train``, ``rollouts``): part of the store's name and manifest.
        batch_size, shard_size, chunk_size: sequences per forward, examples per shard file, label positions
            per LM-head chunk (bounds the [positions x vocab] logits).
        precision: the scoring precision (None: the trainer config's).
        trainer: a ``lightning.Trainer`` config (``_target_`` and arguments; default: one device, auto).
        verify: how an existing store is checked before it is reused (``full``: every shard's sha256; ``size``:
            its files); a broken one is set aside (:func:`reusable`) and scored again.
    """
    _check_request(tokenizer, examples, style, split, k)
    meta = store_meta(model_fingerprint(model), tokenizer, examples, style, split, k, temperature)

    def score(path: Path, make_writer: Callable[[int, int], StoreWriter]) -> None:
        trainer_cfg = OmegaConf.create(trainer if trainer is not None else CPU_TRAINER)
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        data = ScoreDataModule(examples, make_writer, batch_size, pad_id)
        predictor = instantiate_trainer(
            trainer_cfg,
            callbacks=[StoreWriterCallback(data)],
            logger=False,
            default_root_dir=str(path.parent),
            use_distributed_sampler=False,  # each rank scores its own shards
            **({"precision": precision} if precision else {}),
        )
        data.equal_batches = shards_weights(predictor.strategy)  # FSDP: every forward is a collective
        console.print(f"scoring {len(examples)} examples into {path} (complete shards are kept)")
        scorer = TeacherScorer(model, k, temperature, chunk_size)
        predictor.predict(scorer, datamodule=data, return_predictions=False)
        predictor.strategy.barrier()  # every rank's shards are on disk

    return _into_store(tokenizer, examples, meta, store_root, shard_size, score, on_reuse, verify)


def _check_request(tokenizer, examples: list[EncodedExample], style: str, split: str, k: int) -> None:
    if not 1 <= k <= len(tokenizer):
        raise PipelineConfigError(f"k={k} must be in [1, vocab size {len(tokenizer)}]")
    if not examples:
        raise PipelineConfigError(f"nothing to score for style {style!r} ({split})")


def _into_store(tokenizer, examples, meta, store_root, shard_size, score, on_reuse, verify) -> Path:
    """The store ``meta`` names: reused when complete and intact, else ``score(path, make_writer)`` writes
    the missing shards (every rank its own) and rank 0 writes the manifest."""
    path = store_path(store_root, meta)
    # rank 0 decides for all; a concurrent job scoring the same store holds its lock: wait, then reuse it
    with claimed(path, lambda: reusable(path, verify)) as found:
        if found is not None:
            console.print(f"reusing teacher store {path}")
            if on_reuse is not None:
                on_reuse()
        else:
            spec = codec.make_spec(len(tokenizer), int(meta["k"]))

            def make_writer(rank: int, world_size: int) -> StoreWriter:
                return StoreWriter(path, examples, meta, spec, shard_size, rank, world_size)

            score(path, make_writer)
            run_on_rank_zero(lambda: make_writer(0, 1).finalize())  # one manifest over them; the others wait
    TeacherStore(path).check_compatible(tokenizer, examples)
    return path


@torch.no_grad()
def score_rows(model: PreTrainedModel, examples: list[EncodedExample], k: int) -> list[dict[str, torch.Tensor]]:
    """The store rows of ``examples`` as the Hugging Face path scores them (fp32 log-softmax at each label
    position), before any codec: one forward per example (for comparisons, not for speed)."""
    from kdpipe.modules.scorer import topk_signal
    from kdpipe.types import IGNORE_INDEX

    rows = []
    for example in examples:
        logits = model(torch.tensor([example.input_ids], device=model.device)).logits[0].float()
        labels = torch.tensor(example.labels, device=logits.device)
        mask = labels != IGNORE_INDEX
        ids, lps, tail, label_lp = topk_signal(logits[mask], labels[mask], k)
        rows.append({"topk_ids": ids.cpu(), "topk_logprobs": lps.cpu(), "tail_logprob": tail.cpu(),
                     "label_logprob": label_lp.cpu()})  # fmt: skip
    return rows


def row_agreement(first: list[dict], second: list[dict]) -> dict:
    """How far two engines' rows of the same examples agree: the share of label positions with the same top-1
    id, the mean share of top-k ids in common, the largest |log-prob difference| over the ids both have, and
    the largest label log-prob difference."""
    positions = top1 = 0
    overlap, worst, worst_label = 0.0, 0.0, 0.0
    for a, b in zip(first, second):
        positions += a["topk_ids"].shape[0]
        top1 += int((a["topk_ids"][:, 0] == b["topk_ids"][:, 0]).sum())
        worst_label = max(worst_label, float((a["label_logprob"] - b["label_logprob"]).abs().max()))
        for row in range(a["topk_ids"].shape[0]):
            ids_a, ids_b = a["topk_ids"][row].tolist(), b["topk_ids"][row].tolist()
            shared = set(ids_a) & set(ids_b)
            overlap += len(shared) / len(ids_a)
            for token in shared:
                diff = a["topk_logprobs"][row, ids_a.index(token)] - b["topk_logprobs"][row, ids_b.index(token)]
                worst = max(worst, abs(float(diff)))
    return {"positions": positions, "top1_agreement": top1 / max(positions, 1),
            "topk_overlap": overlap / max(positions, 1), "max_abs_dlogprob": worst,
            "max_abs_dlabel_logprob": worst_label}  # fmt: skip


def score_teacher_vllm(
    engine,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[EncodedExample],
    *,
    style: str,
    split: str,
    store_root: str | Path,
    k: int = 16,
    temperature: float = 1.0,
    batch_size: int = 64,
    shard_size: int = 2048,
    on_reuse: Callable[[], None] | None = None,
    verify: str = "full",
) -> Path:
    """:func:`score_teacher` with vLLM: ``engine`` (a :class:`~kdpipe.engines.vllm_engine.VllmEngine`, its
    checkpoint folder and settings) over ``examples`` into the same kind of store. Only ``temperature`` 1
    (vLLM's prompt log-probs are the model's own); a store at k reads at any smaller k and, approximately,
    another temperature."""
    from kdpipe.engines import vllm_engine  # vLLM itself is imported there, lazily

    _check_request(tokenizer, examples, style, split, k)
    if temperature != 1.0:
        raise PipelineConfigError(
            f"engine: vllm scores at temperature 1 only (vLLM applies no temperature to prompt log-probs), "
            f"not {temperature}: score at 1 and read the store with teacher_temperature={temperature}"
        )
    # vLLM's batched kernels are not bit-reproducible across batch shapes: the manifest says so
    identity = {**engine.identity(), "deterministic": False}
    teacher = vllm_engine.checkpoint_fingerprint(engine.model_dir)
    meta = store_meta(teacher, tokenizer, examples, style, split, k, temperature, identity)

    def score(path: Path, make_writer: Callable[[int, int], StoreWriter]) -> None:
        writer = make_writer(global_rank(), world_size())
        console.print(f"scoring {len(examples)} examples with vLLM into {path} (complete shards are kept)")
        vllm_engine.score_pending(engine.llm, writer, examples, k, batch_size)
        barrier()

    return _into_store(tokenizer, examples, meta, store_root, shard_size, score, on_reuse, verify)


def score_with(model, tokenizer, examples: list[EncodedExample], *, chunk_size, precision, trainer, **common) -> Path:
    """:func:`score_teacher_vllm` when ``model`` is a :class:`~kdpipe.engines.vllm_engine.VllmEngine`, else
    :func:`score_teacher` (whose own keys, ``chunk_size``, ``precision`` and ``trainer``, vLLM does not take)."""
    from kdpipe.engines.vllm_engine import VllmEngine

    if isinstance(model, VllmEngine):
        return score_teacher_vllm(model, tokenizer, examples, **common)
    return score_teacher(model, tokenizer, examples, chunk_size=chunk_size, precision=precision, trainer=trainer,
                         **common)  # fmt: skip
