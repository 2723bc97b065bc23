"""What a stage produces: a typed :class:`StageResult`, returned by every kind and persisted by the state.

Artifacts (the export, teacher stores, rollout sets) travel here, never inside the metrics: ``metrics`` is
what ``results.json``, the loggers and a sweeper see; the artifacts are what later stages read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SEQUENCES = ("labels", "rollouts")  # what a teacher store was scored on
Slot = tuple[str, str, str | None]  # where later stages look a store up: (style, sequences, rollout stage or None)


@dataclass(frozen=True)
class StoreRef:
    """A teacher store a stage wrote (or reused): the style and sequences it covers, where it is, and for a
    store of rollouts the rollout stage whose set it scored (``source``), so the stores of two rollout sets
    of one style (the teacher's and the student's, say) are told apart."""

    style: str
    sequences: str  # labels: the dataset's responses | rollouts: a rollout stage's sampled responses
    path: Path
    source: str | None = None  # sequences=rollouts: the name of the rollout stage that wrote the set

    @property
    def slot(self) -> Slot:
        """What a later stage looks the store up by: ``(style, sequences, source)`` (source None for labels)."""
        return (self.style, self.sequences, self.source)

    @property
    def key(self) -> str:
        """A stable one-string name (``fast``, ``fast:rollouts:<rollout stage>``), as shared-stage identities
        record it (``fast:rollouts`` for a store whose source is unknown: kdpipe 0.1)."""
        return slot_key(self.slot)


def slot_key(slot: Slot) -> str:
    """The one-string name of a store slot (see :attr:`StoreRef.key`)."""
    style, sequences, source = slot
    if sequences == "labels":
        return style
    return f"{style}:{sequences}" if source is None else f"{style}:{sequences}:{source}"


@dataclass
class StageResult:
    """A finished stage: its metrics and the artifacts later stages start from or read."""

    metrics: dict  # numbers, lists and short strings only (results.json, loggers, sweepers)
    export: Path | None = None  # HF export of the trained model (sft, kd)
    stores: list[StoreRef] = field(default_factory=list)  # teacher stores written or reused (score)
    rollouts: dict[str, Path] = field(default_factory=dict)  # style -> rollout set sampled (rollout: one style)
    reads: dict[str, str] = field(default_factory=dict)  # what it read (store paths): provenance

    def to_json(self, run_dir: Path) -> dict:
        """Paths inside ``run_dir`` are stored relative to it (a run can move), others absolute."""

        def rel(path: Path) -> str:
            path = Path(path)
            return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)

        return {
            "metrics": self.metrics,
            "export": None if self.export is None else rel(self.export),
            "stores": [
                {"style": s.style, "sequences": s.sequences, "path": rel(s.path)}
                | ({} if s.source is None else {"source": s.source})
                for s in self.stores
            ],
            "rollouts": {style: rel(path) for style, path in self.rollouts.items()},
            "reads": self.reads,
        }

    @classmethod
    def from_json(cls, raw: dict, run_dir: Path) -> StageResult:
        return cls(
            metrics=raw.get("metrics", {}),
            export=None if raw.get("export") is None else run_dir / raw["export"],
            stores=[
                StoreRef(s["style"], s["sequences"], run_dir / s["path"], s.get("source"))
                for s in raw.get("stores", [])
            ],
            rollouts={style: run_dir / path for style, path in raw.get("rollouts", {}).items()},
            reads=raw.get("reads", {}),
        )
