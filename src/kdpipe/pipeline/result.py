"""What a stage produces: a typed :class:`StageResult`, returned by every kind and persisted by the state.

Artifacts (the export, teacher stores, rollout sets) travel here, never inside the metrics: ``metrics`` is
what ``results.json``, the loggers and a sweeper see; the artifacts are what later stages read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SEQUENCES = ("labels", "rollouts")  # what a teacher store was scored on


@dataclass(frozen=True)
class StoreRef:
    """A teacher store a stage wrote (or reused): the style and sequences it covers, and where it is."""

    style: str
    sequences: str  # labels: the dataset's responses | rollouts: the student's own (on-policy)
    path: Path

    @property
    def key(self) -> str:
        """A stable one-string name (``fast``, ``fast:rollouts``), as shared-stage identities record it."""
        return self.style if self.sequences == "labels" else f"{self.style}:{self.sequences}"


@dataclass
class StageResult:
    """A finished stage: its metrics and the artifacts later stages start from or read."""

    metrics: dict  # numbers, lists and short strings only (results.json, loggers, sweepers)
    export: Path | None = None  # HF export of the trained model (sft, kd)
    stores: list[StoreRef] = field(default_factory=list)  # teacher stores written or reused (score)
    rollouts: dict[str, Path] = field(default_factory=dict)  # style -> rollout set sampled (rollout)
    reads: dict[str, str] = field(default_factory=dict)  # what it read (store paths): provenance

    def to_json(self, run_dir: Path) -> dict:
        """Paths inside ``run_dir`` are stored relative to it (a run can move), others absolute."""

        def rel(path: Path) -> str:
            path = Path(path)
            return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)

        return {
            "metrics": self.metrics,
            "export": None if self.export is None else rel(self.export),
            "stores": [{"style": s.style, "sequences": s.sequences, "path": rel(s.path)} for s in self.stores],
            "rollouts": {style: rel(path) for style, path in self.rollouts.items()},
            "reads": self.reads,
        }

    @classmethod
    def from_json(cls, raw: dict, run_dir: Path) -> StageResult:
        return cls(
            metrics=raw.get("metrics", {}),
            export=None if raw.get("export") is None else run_dir / raw["export"],
            stores=[StoreRef(s["style"], s["sequences"], run_dir / s["path"]) for s in raw.get("stores", [])],
            rollouts={style: run_dir / path for style, path in raw.get("rollouts", {}).items()},
            reads=raw.get("reads", {}),
        )
