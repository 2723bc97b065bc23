"""``PostTrainDataModule``: the one DataModule that SFT and KD stages share.

It loads a split of examples, tokenizes them with the model's chat template (labels on assistant tokens
only), scores their difficulty, and serves the stage's curriculum plan as batches. Training batches come
from a :class:`CurriculumBatchSampler`; on resume it skips the batches the restored ``global_step`` already
consumed, so an interrupted stage sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from kdpipe.data.collate import Collator, KDCollator
from kdpipe.data.curriculum import CurriculumBatchSampler
from kdpipe.data.encode import EncodedExample, encode_example, system_prompt_for
from kdpipe.data.scorers import example_scores
from kdpipe.data.sources import load_examples


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
        self.collator = Collator(tokenizer.pad_token_id, packing=bool(data.get("packing", False)))
        if store is not None:
            self.collator = KDCollator(self.collator, store)
        self.datasets: dict[str, list[EncodedExample]] = {}
        self.dropped: dict[str, int] = {}

    def encode_split(self, split: str) -> list[EncodedExample]:
        """Load and tokenize one split; examples over ``data.max_length`` tokens are dropped and counted."""
        if split not in self.datasets:
            examples = load_examples(self.data_cfg, split)
            max_length = self.data_cfg.get("max_length")
            encoded = [
                encode_example(self.tokenizer, ex, style, max_length, system_prompt_for(self.data_cfg, style))
                for style in self.styles
                for ex in examples
            ]
            self.datasets[split] = [e for e in encoded if e is not None]
            self.dropped[split] = len(encoded) - len(self.datasets[split])
            if not self.datasets[split]:
                raise ValueError(f"data split {split!r} is empty after tokenization (max_length too small?)")
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            train = self.encode_split("train")
            self.encode_split("val")
            if self.store is not None:
                self.store.check_compatible(self.tokenizer, train)

    def make_sampler(self, num_replicas: int = 1, rank: int = 0) -> CurriculumBatchSampler:
        """The training plan's sampler (the same for the same seed and data); under DDP each rank gets
        its rows of every global batch."""
        train = self.encode_split("train")
        cfg = self.curriculum_cfg
        schedule_kwargs = {k: v for k, v in cfg.items() if k not in ("scorer", "schedule")}
        max_tokens = self.data_cfg.get("max_tokens") if self.data_cfg.get("packing") else None
        difficulty = [0.0] * len(train)  # a random order ignores difficulty: nothing to score
        if cfg.schedule != "random":
            collate = Collator(self.tokenizer.pad_token_id)
            difficulty = example_scores(
                train, cfg, self.scorer_store, model=self.scorer_model, collate=collate, cache_dir=self.score_cache_dir
            )
        return CurriculumBatchSampler(
            difficulty=difficulty,
            lengths=[len(e.input_ids) for e in train],
            num_batches=self.num_batches,
            schedule=cfg.schedule,
            batch_size=self.batch_size,
            max_tokens=max_tokens,
            seed=self.seed,
            schedule_kwargs=schedule_kwargs,
            num_replicas=num_replicas,
            rank=rank,
        )

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
            self.encode_split("train"),
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=int(self.data_cfg.get("num_workers", 0)),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.encode_split("val"),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=Collator(self.tokenizer.pad_token_id),
            num_workers=int(self.data_cfg.get("num_workers", 0)),
        )
