"""``TeacherScorer``: the teacher's top-k signal at every label position, via ``Trainer.predict``.

Teacher forcing on prompt + label response: for each label position the scorer returns the top-k token ids,
their log-probs at temperature T, the log of the remaining (tail) mass and the log-prob of the label token.
Logits are computed only at label positions and in chunks of ``chunk_size`` rows, never for the whole batch.
"""

from __future__ import annotations

import lightning as L
import torch
from transformers import PreTrainedModel

from kdpipe.models.heads import backbone_hidden, head_logits, lm_head
from kdpipe.types import IGNORE_INDEX


def topk_signal(
    logits: torch.Tensor, labels: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs, tail log-mass and label log-prob for logits [n, V] (float32 math)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # sorted, descending
    rest = logprobs.scatter(-1, top_ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)  # exact log of the mass outside the top-k (-inf when k = V)
    label_lp = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return top_ids, top_lp, tail, label_lp


class TeacherScorer(L.LightningModule):
    """Wraps a teacher model for ``Trainer.predict``; each prediction is a list of per-example rows."""

    def __init__(self, model: PreTrainedModel, k: int, temperature: float = 1.0, chunk_size: int = 4096) -> None:
        super().__init__()
        self.model, self.k, self.temperature, self.chunk_size = model, k, temperature, chunk_size

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        hidden = backbone_hidden(self.model, batch)
        weight, bias = lm_head(self.model)
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        flat_hidden, flat_labels = hidden[mask], labels[mask]
        parts = []
        for start in range(0, flat_hidden.shape[0], self.chunk_size):
            h = flat_hidden[start : start + self.chunk_size]
            logits = head_logits(h, weight, bias)
            parts.append(topk_signal(logits, flat_labels[start : start + self.chunk_size], self.k, self.temperature))
        ids, lps, tail, label_lp = (torch.cat([p[i] for p in parts]).cpu() for i in range(4))
        counts = mask.sum(dim=1).tolist()
        out, start = [], 0
        for index, n in zip(batch["indices"].tolist(), counts):
            out.append(
                {
                    "index": index,
                    "topk_ids": ids[start : start + n],
                    "topk_logprobs": lps[start : start + n],
                    "tail_logprob": tail[start : start + n],
                    "label_logprob": label_lp[start : start + n],
                }
            )
            start += n
        return out
