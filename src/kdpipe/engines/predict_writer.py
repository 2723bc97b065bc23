"""Scoring into a store with ``Trainer.predict``: a DataModule that serves each rank the examples of its own
shards, and a prediction writer that streams the scorer's outputs into that rank's :class:`StoreWriter`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Sampler

from kdpipe.data.collate import Collator
from kdpipe.store.writer import StoreWriter
from kdpipe.types import EncodedExample

FILLER = -1  # index of a filler row: scored to keep ranks in step, never written


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
        equal_batches: bool = False,
    ) -> None:
        super().__init__()
        self.examples, self.make_writer, self.batch_size = examples, make_writer, batch_size
        self.equal_batches = equal_batches
        self.collate = Collator(pad_token_id)
        self.writer: StoreWriter | None = None
        self.batches: list[list[int]] = []

    def setup(self, stage: str | None = None) -> None:
        """The rank's writer and batches, fixed here: every rank decides before any of them writes a shard."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.writer = self.make_writer(rank, world)
        pending = self.writer.pending_examples()
        self.batches = [pending[i : i + self.batch_size] for i in range(0, len(pending), self.batch_size)]
        # Filler batches (index -1: scored, never written) keep the ranks in step. Lightning needs a batch on
        # every rank (a rank whose shards are all done, or that owns none, has none); a sharded model (FSDP)
        # gathers its weights in every forward, a collective, so there every rank runs as many as the busiest.
        target = 1
        if self.equal_batches and world > 1:
            target = max(-(-len(self.writer.pending_examples(r)) // self.batch_size) for r in range(world))
        self.batches += [[FILLER]] * (max(target, 1) - len(self.batches))

    def _collate(self, indices: list[int]) -> dict:
        batch = self.collate([self.examples[max(i, 0)] for i in indices])
        batch["indices"] = torch.tensor(indices)
        return batch

    def predict_dataloader(self) -> DataLoader:
        # Lightning cannot check a custom batch sampler for drop_last; this one yields every batch it holds
        warnings.filterwarnings("ignore", message="You are using a custom batch sampler")
        return DataLoader(_Indices(len(self.examples)), batch_sampler=_Batches(self.batches), collate_fn=self._collate)


class _Batches(Sampler[list[int]]):
    """A fixed list of batches of indices."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Indices(torch.utils.data.Dataset):
    """Item ``i`` is ``i`` (also :data:`FILLER`, which a ``range`` would wrap around to the last example)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class StoreWriterCallback(BasePredictionWriter):
    """Hands every scored example to the rank's store writer as soon as its batch is done."""

    def __init__(self, data: ScoreDataModule) -> None:
        super().__init__(write_interval="batch")
        self.data = data

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for row in prediction:
            if row["index"] == FILLER:
                continue
            self.data.writer.add(
                row["index"], row["topk_ids"], row["topk_logprobs"], row["tail_logprob"], row["label_logprob"]
            )
