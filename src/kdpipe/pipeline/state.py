"""``pipeline_state.json``: what a run has done, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdpipe.pipeline.spec import PipelineConfigError, StageSpec
from kdpipe.utils.dist import is_rank_zero
from kdpipe.utils.io import atomic_write_json, read_json

STATE_FILE = "pipeline_state.json"
STATE_VERSION = 1


@dataclass
class StageRecord:
    """One stage's progress. ``status`` goes pending -> running -> done."""

    name: str
    kind: str
    model: str
    dir: str
    status: str = "pending"
    metrics: dict = field(default_factory=dict)
    export: str | None = None  # HF export, relative to the run dir
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class PipelineState:
    """The run's stages in order and, per model, the export the next stage of that model starts from."""

    run_dir: Path
    stages: list[StageRecord]
    model_paths: dict[str, str | None]
    stores: dict[str, str] = field(default_factory=dict)  # response style -> latest teacher store (absolute)
    rollouts: dict[str, str] = field(default_factory=dict)  # response style -> latest rollout set (absolute)
    version: int = STATE_VERSION

    @classmethod
    def new(cls, run_dir: Path, specs: list[StageSpec], models: list[str]) -> PipelineState:
        records = [StageRecord(s.name, s.kind, s.model, s.dirname) for s in specs]
        return cls(run_dir=run_dir, stages=records, model_paths={m: None for m in models})

    @classmethod
    def load(cls, run_dir: Path, specs: list[StageSpec]) -> PipelineState:
        """Read a run's state and check it belongs to the same stage order."""
        path = run_dir / STATE_FILE
        if not path.exists():
            raise PipelineConfigError(f"resume directory {run_dir} has no {STATE_FILE}: not a kdpipe run")
        raw = read_json(path)
        if raw.get("version") != STATE_VERSION:
            raise PipelineConfigError(f"{path}: state version {raw.get('version')} (expected {STATE_VERSION})")
        state = cls(
            run_dir=run_dir,
            stages=[StageRecord(**s) for s in raw["stages"]],
            model_paths=raw["model_paths"],
            stores=raw.get("stores", {}),
            rollouts=raw.get("rollouts", {}),
        )
        saved = [s.name for s in state.stages]
        wanted = [s.name for s in specs]
        if saved != wanted:
            raise PipelineConfigError(f"{path}: the run's stage order {saved} differs from the config's {wanted}")
        return state

    def save(self) -> None:
        """Write ``pipeline_state.json`` (global rank 0 only: every rank keeps the same state in memory)."""
        if not is_rank_zero():
            return
        data = asdict(self)
        data.pop("run_dir")
        atomic_write_json(self.run_dir / STATE_FILE, data)

    def model_path(self, model: str) -> Path | None:
        """Absolute path of the export the next stage of ``model`` starts from (None: build it fresh)."""
        rel = self.model_paths.get(model)
        return self.run_dir / rel if rel else None

    def mark_running(self, index: int) -> None:
        record = self.stages[index]
        record.status = "running"
        record.started_at = record.started_at or time.time()
        self.save()

    def mark_done(self, index: int, metrics: dict, export: Path | None) -> None:
        record = self.stages[index]
        record.status, record.metrics, record.finished_at = "done", metrics, time.time()
        if export is not None:  # relative inside the run (it can move); absolute for a shared stage's export
            export = Path(export)
            record.export = str(export.relative_to(self.run_dir) if export.is_relative_to(self.run_dir) else export)
            self.model_paths[record.model] = record.export
        self.stores.update(metrics.get("stores", {}))
        self.rollouts.update(metrics.get("rollouts", {}))
        self.save()
