"""Scoring into a store with ``Trainer.predict``: a DataModule that serves each rank the examples of its own
shards, and a prediction writer that streams the scorer's outputs into that rank's :class:`StoreWriter`."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from kdpipe.data.collate import Collator
from kdpipe.data.encode import EncodedExample
from kdpipe.store.writer import StoreWriter


class ScoreDataModule(L.LightningDataModule):
    """Predict batches of the examples this rank still has to score (complete shards are skipped).

    ``make_writer(rank, world_size)`` builds the rank's writer once the trainer knows its rank, so the same
    code runs in one process or under DDP (with ``use_distributed_sampler=False``: shards, not a sampler,
    decide which rank scores what).
    """

    def __init__(
        self,
        examples: list[EncodedExample],
        make_writer: Callable[[int, int], StoreWriter],
        batch_size: int,
        pad_token_id: int,
    ) -> None:
        super().__init__()
        self.examples, self.make_writer, self.batch_size = examples, make_writer, batch_size
        self.collate = Collator(pad_token_id)
        self.writer: StoreWriter | None = None

    def setup(self, stage: str | None = None) -> None:
        self.writer = self.make_writer(self.trainer.global_rank, self.trainer.world_size)

    def _collate(self, items: list[tuple[int, EncodedExample]]) -> dict:
        batch = self.collate([e for _, e in items])
        batch["indices"] = torch.tensor([i for i, _ in items])
        return batch

    def predict_dataloader(self) -> DataLoader:
        pending = self.writer.pending_examples()
        return DataLoader(
            [(i, self.examples[i]) for i in pending],
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self._collate,
        )


class StoreWriterCallback(BasePredictionWriter):
    """Hands every scored example to the rank's store writer as soon as its batch is done."""

    def __init__(self, data: ScoreDataModule) -> None:
        super().__init__(write_interval="batch")
        self.data = data

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for row in prediction:
            self.data.writer.add(
                row["index"], row["topk_ids"], row["topk_logprobs"], row["tail_logprob"], row["label_logprob"]
            )
