"""``PostTrainDataModule``: the one DataModule that SFT and KD stages share.

It loads a split of examples, tokenizes them with the model's chat template (labels on assistant tokens
only), scores their difficulty, and serves the stage's curriculum plan as batches. Training batches come
from a :class:`CurriculumBatchSampler`; on resume it skips the batches the restored ``global_step`` already
consumed, so an interrupted stage sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from kdpipe.data.collate import Collator, KDCollator
from kdpipe.data.curriculum import CurriculumBatchSampler, MixedBatchSampler, WithPlaceholders, rank_share_of
from kdpipe.data.encode import encode_example, system_prompt_for
from kdpipe.data.records import Problem
from kdpipe.data.scorers import example_scores
from kdpipe.data.sources import LoadedSplit, load_split, subset_by_id
from kdpipe.store import posthoc
from kdpipe.types import EncodedExample
from kdpipe.utils.io import atomic_write_text


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, data_cfg: DictConfig, examples: list[dict], styles: Sequence[str]
) -> tuple[list[EncodedExample], int]:
    """Tokenize examples once per style (each with its style's system prompt); returns the encoded examples
    and how many were dropped for exceeding ``data.max_length``. With ``data.overlong=truncate`` long examples
    are cut instead (``EncodedExample.truncated``), and dropped only when no label token is left."""
    max_length, overlong = data_cfg.get("max_length"), str(data_cfg.get("overlong") or "drop")
    unlabelled = [ex["id"] for ex in examples if ex.get("unlabelled")]
    if unlabelled:
        raise ValueError(
            f"{len(unlabelled)} prompt-only example(s) (no response), e.g. {unlabelled[0]!r}: there is nothing to "
            "train on or score; only rollout stages read prompt-only records"
        )
    encoded = [
        encode_example(tokenizer, ex, style, max_length, system_prompt_for(data_cfg, style), overlong)
        for style in styles
        for ex in examples
    ]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def write_skipped_records(path: Path, skipped: Mapping[str, Sequence[Problem]]) -> Path | None:
    """Every invalid record dropped (``data.on_error=skip``), one JSON line each: ``{"split", "where"
    (file:line), "reason"}``, split by split; written only when there is one (returns the path, else None)."""
    lines = [json.dumps(problem.to_json(split)) + "\n" for split, problems in skipped.items() for problem in problems]
    if not lines:
        return None
    atomic_write_text(path, "".join(lines))
    return path


class PostTrainDataModule(L.LightningDataModule):
    """Tokenized, curriculum-ordered batches of one dataset in one or more response styles.

    Args:
        tokenizer: the model's tokenizer (its chat template renders the examples).
        data: the ``data`` config (source, sizes, ``max_length``, ``packing``, ``max_tokens``, ...).
        style: the response variant(s) to train on (``reasoning``, ``fast``, or a list: every example once
            per style, each prompted with its style's system prompt from ``data.system_prompts``).
        curriculum: the ``curriculum`` config (``scorer``, ``schedule`` and the schedule's options).
        batch_size: examples per batch (when not packing).
        num_batches: batches the training plan holds (steps times gradient accumulation).
        seed: seed of the curriculum plan.
        store: a :class:`~kdpipe.store.reader.TeacherStore` to join (KD); checked against the data first.
        scorer_store: the store the curriculum's teacher-based scorers read (default: ``store``).
        scorer_model: the model the ``student_loss`` scorer runs (the stage's model, at stage start).
        score_cache_dir: where model-based scores are cached (the stage's ``scores/`` folder), so a resumed
            stage reuses its stage-start scores.
        onpolicy_examples: the student's own sampled responses (rollout records) to train on as well.
        onpolicy_store: the teacher's signal on those responses (KD).
        onpolicy_lambda: the share of every training batch drawn from the on-policy pool (0: labels only,
            1: on-policy only).
        train_fraction: train on this id-hashed, nested share of the training split.
        train_examples: the training pool itself (example dicts, e.g. the kept records of a rollout set: a
            stage's ``data_from``), instead of the data config's training split; validation still reads the
            data config's ``val`` split.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        data: DictConfig,
        style: str | Sequence[str],
        curriculum: DictConfig,
        batch_size: int,
        num_batches: int,
        seed: int = 0,
        eval_batch_size: int | None = None,
        store=None,
        scorer_store=None,
        scorer_model=None,
        score_cache_dir=None,
        onpolicy_examples: list[dict] | None = None,
        onpolicy_store=None,
        onpolicy_lambda: float = 0.0,
        train_fraction: float = 1.0,
        train_examples: list[dict] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer, self.data_cfg = tokenizer, data
        self.styles = [style] if isinstance(style, str) else [str(s) for s in style]
        if store is not None and len(self.styles) != 1:
            raise ValueError(f"a teacher store covers one response style; got styles {self.styles}")
        self.curriculum_cfg, self.batch_size, self.num_batches = curriculum, batch_size, num_batches
        self.seed = seed
        self.eval_batch_size = eval_batch_size or batch_size
        self.store = store
        self.scorer_store = scorer_store if scorer_store is not None else store
        self.scorer_model, self.score_cache_dir = scorer_model, score_cache_dir
        if not 0.0 <= onpolicy_lambda <= 1.0:
            raise ValueError(f"onpolicy_lambda must be in [0, 1], got {onpolicy_lambda}")
        if onpolicy_lambda > 0 and not onpolicy_examples:
            raise ValueError(f"onpolicy_lambda={onpolicy_lambda} but no on-policy examples were given")
        self.onpolicy_raw, self.onpolicy_store, self.onpolicy_lambda = (
            onpolicy_examples,
            onpolicy_store,
            onpolicy_lambda,
        )
        self.onpolicy: list[EncodedExample] | None = None
        self.train_fraction = float(train_fraction)
        self.train_raw = train_examples
        self.collator = Collator(tokenizer.pad_token_id, packing=bool(data.get("packing", False)))
        stores = [st for st in (store, onpolicy_store if onpolicy_lambda > 0 else None) if st is not None]
        if stores:
            self.collator = KDCollator(self.collator, posthoc.join(stores))
        self.datasets: dict[str, list[EncodedExample]] = {}
        self.dropped: dict[str, int] = {}  # per split: examples over data.max_length, dropped
        self.truncated: dict[str, int] = {}  # per split: examples cut to data.max_length (overlong=truncate)
        self.skipped_invalid: dict[str, int] = {}  # per split: invalid records dropped (data.on_error=skip)
        self.skipped: dict[str, tuple[Problem, ...]] = {}  # per split: those records, where and why

    def encode_split(self, split: str) -> list[EncodedExample]:
        """Load and tokenize one split; examples over ``data.max_length`` tokens are dropped (or truncated)
        and counted, as are the invalid records a file source skipped."""
        if split not in self.datasets:
            if split == "train" and self.train_raw is not None:  # e.g. a rollout set (data_from)
                loaded = LoadedSplit(list(self.train_raw))
            else:
                loaded = load_split(self.data_cfg, split)
            self.skipped_invalid[split], self.skipped[split] = loaded.skipped_invalid, loaded.problems
            raw = subset_by_id(loaded.examples, self.train_fraction) if split == "train" else loaded.examples
            encoded, self.dropped[split] = encode_examples(self.tokenizer, self.data_cfg, raw, self.styles)
            self.truncated[split] = sum(e.truncated for e in encoded)
            if not encoded:
                raise ValueError(f"data split {split!r} is empty after tokenization (max_length too small?)")
            self.datasets[split] = encoded
        return self.datasets[split]

    def skipped_records(self, splits: Sequence[str]) -> dict[str, list[Problem]]:
        """The invalid records dropped (``data.on_error=skip``) from each of ``splits``: those of the splits this
        module loaded, and of any other split read now (e.g. the evaluation's; parsed splits are cached)."""
        for split in splits:
            if split == "train" and self.train_raw is not None:
                self.skipped.setdefault(split, ())
            if split not in self.skipped:
                self.skipped[split] = load_split(self.data_cfg, split).problems
        return {split: list(self.skipped[split]) for split in dict.fromkeys(splits)}

    def encode_onpolicy(self) -> list[EncodedExample]:
        """The on-policy pool, tokenized like the labels (empty when the stage mixes none in)."""
        if self.onpolicy is None:
            if self.onpolicy_lambda == 0:
                self.onpolicy = []
            else:
                self.onpolicy, self.dropped["onpolicy"] = encode_examples(
                    self.tokenizer, self.data_cfg, self.onpolicy_raw or [], self.styles
                )
                if not self.onpolicy:
                    raise ValueError("the on-policy examples are all empty after tokenization (max_length?)")
        return self.onpolicy

    def train_examples(self) -> list[EncodedExample]:
        """The training dataset: the label pool, then the on-policy pool (the samplers index into both)."""
        return self.encode_split("train") + self.encode_onpolicy()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            train = self.encode_split("train")
            self.encode_split("val")
            if self.store is not None and self.onpolicy_lambda < 1:
                self.store.check_compatible(self.tokenizer, train)
            if self.onpolicy_store is not None and self.onpolicy_lambda > 0:
                self.onpolicy_store.check_compatible(self.tokenizer, self.encode_onpolicy())

    def pool_sampler(self, examples: list[EncodedExample], store, num_replicas: int, rank: int, batch_size: int):
        """The curriculum plan over one pool of examples."""
        cfg = self.curriculum_cfg
        schedule_kwargs = {k: v for k, v in cfg.items() if k not in ("scorer", "schedule")}
        max_tokens = self.data_cfg.get("max_tokens") if self.data_cfg.get("packing") else None
        difficulty = [0.0] * len(examples)  # a random order ignores difficulty: nothing to score
        if cfg.schedule != "random":
            collate = Collator(self.tokenizer.pad_token_id)
            difficulty = example_scores(
                examples, cfg, store, model=self.scorer_model, collate=collate, cache_dir=self.score_cache_dir
            )
        return CurriculumBatchSampler(
            difficulty=difficulty,
            lengths=[len(e.input_ids) for e in examples],
            num_batches=self.num_batches,
            schedule=cfg.schedule,
            batch_size=batch_size,
            max_tokens=max_tokens,
            seed=self.seed,
            schedule_kwargs=schedule_kwargs,
            num_replicas=num_replicas,
            rank=rank,
        )

    def make_sampler(self, num_replicas: int = 1, rank: int = 0) -> CurriculumBatchSampler | MixedBatchSampler:
        """The training plan's sampler (the same for the same seed and data); under DDP each rank gets
        its rows of every global batch. With on-policy data, each batch mixes the two pools."""
        train = self.encode_split("train")
        if self.onpolicy_lambda == 0:
            return self.pool_sampler(train, self.scorer_store, num_replicas, rank, self.batch_size)
        global_batch = self.batch_size * num_replicas
        labels = self.pool_sampler(train, self.scorer_store, 1, 0, global_batch)
        onpolicy = self.pool_sampler(self.encode_onpolicy(), self.onpolicy_store, 1, 0, global_batch)
        return MixedBatchSampler(labels, onpolicy, self.onpolicy_lambda, len(train), num_replicas, rank)

    def consumed_batches(self) -> int:
        """Training batches the (possibly restored) trainer has already consumed."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = self.make_sampler(world, rank)
        sampler.start = self.consumed_batches()
        return DataLoader(
            WithPlaceholders(self.train_examples()),  # a rank with no row of a short global batch gets one
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=int(self.data_cfg.get("num_workers", 0)),
        )

    def val_dataloader(self) -> DataLoader:
        """Each rank validates rows ``rank::world_size`` (topped up with placeholder rows, so that every rank
        runs as many batches); the modules sum loss and label count over the ranks."""
        examples = self.encode_split("val")
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            examples = rank_share_of(examples, trainer.global_rank, trainer.world_size)
        return DataLoader(
            examples,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=Collator(self.tokenizer.pad_token_id),
            num_workers=int(self.data_cfg.get("num_workers", 0)),
        )
