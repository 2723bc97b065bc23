"""A Lightning prediction writer that streams ``TeacherScorer`` outputs into a :class:`StoreWriter`."""

from __future__ import annotations

from lightning.pytorch.callbacks import BasePredictionWriter

from kdpipe.store.writer import StoreWriter


class StoreWriterCallback(BasePredictionWriter):
    """Hands every scored example to the store writer as soon as its batch is done."""

    def __init__(self, writer: StoreWriter) -> None:
        super().__init__(write_interval="batch")
        self.writer = writer

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for row in prediction:
            self.writer.add(
                row["index"], row["topk_ids"], row["topk_logprobs"], row["tail_logprob"], row["label_logprob"]
            )
