"""Batch encoded examples: dynamic padding, or padding-free packing into one row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdpipe.types import IGNORE_INDEX, EncodedExample


@dataclass
class Collator:
    """Collate :class:`EncodedExample` lists into model inputs.

    ``packing=False``: rows padded to the longest example (right padding), with an ``attention_mask``.
    ``packing=True``: all examples concatenated into one row with ``position_ids`` restarting at 0 for each;
    no ``attention_mask``, so ``transformers`` builds a block-diagonal causal mask from the positions and no
    token attends across examples. Labels are pre-shifted, so no label crosses an example boundary either.
    """

    pad_token_id: int
    packing: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[EncodedExample]) -> dict:
        batch = {
            "ids": [e.id for e in examples],
            "levels": torch.tensor([e.level if e.level is not None else 0 for e in examples]),
        }
        if self.packing:
            ids = [t for e in examples for t in e.input_ids]
            batch["input_ids"] = torch.tensor([ids])
            batch["labels"] = torch.tensor([[t for e in examples for t in e.labels]])
            batch["position_ids"] = torch.tensor([[p for e in examples for p in range(len(e.input_ids))]])
            return batch
        width = max(len(e.input_ids) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            input_ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            attention_mask[row, :n] = 1
        batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        return batch


@dataclass
class KDCollator:
    """A :class:`Collator` that also joins the teacher store's rows at each example's label positions.

    Adds ``topk_ids`` [B, T, k] int64, ``topk_logprobs`` [B, T, k] float32, ``tail_logprob`` [B, T] float32
    and ``has_teacher`` [B, T] bool (False at non-label positions and padding). Shapes follow the batch
    layout, so packed batches get [1, total, k].
    """

    base: Collator
    store: object  # kdpipe.store.reader.TeacherStore (kept loose to avoid an import cycle)

    def __call__(self, examples: list[EncodedExample]) -> dict:
        batch = self.base(examples)
        rows, width = batch["input_ids"].shape
        k = self.store.k
        # an example without label tokens (a DDP rank's placeholder row, see kdpipe.data.curriculum) needs none
        labeled = [e for e in examples if e.num_label_tokens]
        has_teacher = batch["labels"] != IGNORE_INDEX
        topk_ids = torch.zeros((rows, width, k), dtype=torch.long)
        topk_logprobs = torch.full((rows, width, k), float("-inf"))
        tail = torch.zeros((rows, width))
        if labeled:
            teacher, counts = self.store.get_many([e.id for e in labeled])
            for e, n in zip(labeled, counts):
                if n != e.num_label_tokens:
                    raise ValueError(
                        f"teacher store has {n} rows for example {e.id!r} with {e.num_label_tokens} labels"
                    )
            # label positions in row-major order are the examples' label positions in order: one assignment each
            topk_ids[has_teacher] = teacher.topk_ids
            topk_logprobs[has_teacher] = teacher.topk_logprobs
            tail[has_teacher] = teacher.tail_logprob
        batch.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logprob=tail, has_teacher=has_teacher)
        return batch
