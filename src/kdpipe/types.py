"""Types shared by the data, store, loss and module layers (below all of them, so imports point one way)."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label of a position that carries no loss (prompt tokens, padding)


@dataclass
class EncodedExample:
    """One tokenized example: ids, shifted labels and the fields the curriculum and the store key on.

    Labels are stored *already shifted*: ``labels[t]`` is the token to predict at position ``t``."""

    id: str
    input_ids: list[int]
    labels: list[int]
    level: int | float | None = None
    style: str | None = None
    truncated: bool = False  # cut to ``max_length`` tokens (``overlong="truncate"``)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)
