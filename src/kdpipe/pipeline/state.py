"""``pipeline_state.json``: what a run has done, so an interrupted run resumes where it stopped.

Each finished stage keeps its :class:`~kdpipe.pipeline.result.StageResult`; what a later stage starts from
(the latest export of each model, the latest store of each (style, sequences, rollout stage), each rollout
stage's set) is derived from them in order, so there is one record of each artifact. A store of rollouts
saved before stores named the rollout stage they scored gets the latest rollout stage of its style before it.

Format versions: 2 (this one). A version-1 state (kdpipe 0.1: artifacts inside the metrics) is migrated on
load; any other version is refused, naming it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.spec import StageSpec
from kdpipe.utils.dist import is_rank_zero
from kdpipe.utils.io import atomic_write_json, read_json

STATE_FILE = "pipeline_state.json"
STATE_VERSION = 2


@dataclass
class StageRecord:
    """One stage's progress. ``status`` goes pending -> running -> done; ``result`` is set when done."""

    name: str
    kind: str
    model: str
    dir: str
    status: str = "pending"
    result: StageResult | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def metrics(self) -> dict:
        return self.result.metrics if self.result is not None else {}


def _migrate_v1(raw: dict) -> dict:
    """A kdpipe 0.1 state: stores and rollout sets were keys of the metrics (``stores: {"fast:rollouts": p}``)."""
    stages = []
    for s in raw["stages"]:
        metrics = dict(s.get("metrics") or {})
        stores = [
            {"style": key.split(":")[0], "sequences": "rollouts" if ":" in key else "labels", "path": path}
            for key, path in (metrics.pop("stores", None) or {}).items()
        ]
        rollouts = metrics.pop("rollouts", None) or {}
        read = {k: metrics.pop(k) for k in ("store", "onpolicy_store") if k in metrics}  # None: read no store
        reads = {k: v for k, v in read.items() if isinstance(v, str)}
        for key, value in list(metrics.items()):  # per-store stats kept their path: now in `stores`, named here
            if isinstance(value, dict) and "path" in value and key.endswith("_store"):
                metrics[key] = {"name": Path(value["path"]).name, **{k: v for k, v in value.items() if k != "path"}}
        done = s.get("status") == "done"
        result = {"metrics": metrics, "export": s.get("export"), "stores": stores, "rollouts": rollouts, "reads": reads}
        stages.append({**{k: s[k] for k in ("name", "kind", "model", "dir", "status", "started_at", "finished_at")},
                       "result": result if done else None})  # fmt: skip
    return {"version": STATE_VERSION, "stages": stages}


def _name_rollout_sources(records: list[StageRecord]) -> None:
    """Stores of rollouts saved without their source (kdpipe before stores were keyed by the rollout stage):
    the latest finished rollout stage of the store's style before it, as that kdpipe looked it up (in place)."""
    latest: dict[str, str] = {}
    for record in records:
        if record.status != "done" or record.result is None:
            continue
        for style in record.result.rollouts:
            latest[style] = record.name
        if any(ref.sequences == "rollouts" and ref.source is None for ref in record.result.stores):
            record.result.stores = [
                replace(ref, source=latest.get(ref.style)) if ref.sequences == "rollouts" and ref.source is None
                else ref
                for ref in record.result.stores
            ]  # fmt: skip


@dataclass
class PipelineState:
    """The run's stages in order, each with its result once done."""

    run_dir: Path
    stages: list[StageRecord]
    version: int = STATE_VERSION

    @classmethod
    def new(cls, run_dir: Path, specs: list[StageSpec]) -> PipelineState:
        return cls(run_dir=run_dir, stages=[StageRecord(s.name, s.kind, s.model, s.dirname) for s in specs])

    @classmethod
    def load(cls, run_dir: Path, specs: list[StageSpec]) -> PipelineState:
        """Read a run's state (migrating version 1) and check it belongs to the same stage order."""
        path = run_dir / STATE_FILE
        if not path.exists():
            raise PipelineConfigError(f"resume directory {run_dir} has no {STATE_FILE}: not a kdpipe run")
        raw = read_json(path)
        if raw.get("version") == 1:
            raw = _migrate_v1(raw)
        if raw.get("version") != STATE_VERSION:
            raise PipelineConfigError(
                f"{path}: state format version {raw.get('version')!r}; this kdpipe reads versions 1 and "
                f"{STATE_VERSION}: resume it with the kdpipe that wrote it, or start a new run"
            )
        records = []
        for s in raw["stages"]:
            result = StageResult.from_json(s["result"], run_dir) if s.get("result") is not None else None
            records.append(StageRecord(**{**s, "result": result}))
        _name_rollout_sources(records)
        state = cls(run_dir=run_dir, stages=records)
        saved, wanted = [s.name for s in state.stages], [s.name for s in specs]
        if saved != wanted:
            raise PipelineConfigError(f"{path}: the run's stage order {saved} differs from the config's {wanted}")
        return state

    def save(self) -> None:
        """Write ``pipeline_state.json`` (global rank 0 only: every rank keeps the same state in memory)."""
        if not is_rank_zero():
            return
        stages = []
        for s in self.stages:
            result = s.result.to_json(self.run_dir) if s.result is not None else None
            stages.append({"name": s.name, "kind": s.kind, "model": s.model, "dir": s.dir, "status": s.status,
                           "result": result, "started_at": s.started_at, "finished_at": s.finished_at})  # fmt: skip
        atomic_write_json(self.run_dir / STATE_FILE, {"version": self.version, "stages": stages})

    def _done(self) -> list[StageRecord]:
        return [s for s in self.stages if s.status == "done" and s.result is not None]

    def model_path(self, model: str, before: int | None = None, skip: frozenset[int] = frozenset()) -> Path | None:
        """The export the next stage of ``model`` starts from: its latest one (None: build it fresh), among the
        stages before index ``before`` (None: all), leaving out the indices in ``skip`` (controls, whose
        weights no later stage continues from)."""
        exports = [
            s.result.export
            for i, s in enumerate(self.stages[:before])
            if i not in skip and s.status == "done" and s.result is not None
            and s.model == model and s.result.export is not None
        ]  # fmt: skip
        return exports[-1] if exports else None

    @property
    def stores(self) -> dict[tuple[str, str, str | None], Path]:
        """(style, sequences, rollout stage or None) -> the latest teacher store scored for it."""
        return {ref.slot: ref.path for s in self._done() for ref in s.result.stores}

    @property
    def rollouts(self) -> dict[str, Path]:
        """rollout stage name -> the set it sampled (its latest entry's, for a stage the order repeats)."""
        return {s.name: path for s in self._done() for path in s.result.rollouts.values()}

    def mark_running(self, index: int) -> None:
        record = self.stages[index]
        record.status = "running"
        record.started_at = record.started_at or time.time()
        self.save()

    def mark_done(self, index: int, result: StageResult) -> None:
        record = self.stages[index]
        record.status, record.result, record.finished_at = "done", result, time.time()
        self.save()


@dataclass
class PipelineRun:
    """What :func:`~kdpipe.pipeline.runner.run_pipeline` returns: the metrics (``results``, as in
    ``results.json``) and, apart from them, every stage's typed result (exports, stores, rollout sets)."""

    run_dir: Path
    results: dict
    stages: list[StageRecord]

    def result(self, name: str) -> StageResult:
        """The result of the last finished stage called ``name``."""
        for record in reversed(self.stages):
            if record.name == name and record.result is not None:
                return record.result
        raise KeyError(f"no finished stage {name!r} in {self.run_dir}")
