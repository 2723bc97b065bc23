"""What a stage is given: the whole config, its own settings and folder, where its model starts, and the
artifacts earlier stages left (the latest teacher store of each style, the latest rollout set)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.spec import StageSpec, stage_styles


@dataclass
class StageContext:
    """Everything a stage needs; every kind is a function ``(StageContext) -> StageResult``."""

    cfg: DictConfig
    spec: StageSpec
    run_dir: Path
    stage_dir: Path
    start_from: Path | None  # export of the previous stage of the same model; None: build it fresh
    stores: dict[tuple[str, str], Path] = field(default_factory=dict)  # (style, sequences) -> latest store
    rollouts: dict[str, Path] = field(default_factory=dict)  # style -> latest rollout set of the student

    @property
    def settings(self) -> DictConfig:
        return self.spec.config

    @property
    def model_cfg(self) -> DictConfig:
        return self.cfg.models[self.spec.model]

    @property
    def seed(self) -> int:
        """The stage's seed: ``settings.seed`` when pinned, else the run's seed plus the stage's index."""
        pinned = self.settings.get("seed")
        return int(pinned) if pinned is not None else int(self.cfg.seed) + self.spec.index

    @property
    def styles(self) -> list[str]:
        """The stage's response styles (``style``: one name or a list)."""
        return stage_styles(self.settings)

    def rollout_set(self, style: str) -> Path:
        """The latest rollout set of ``style`` (written by an earlier ``rollout`` stage of this run)."""
        if style not in self.rollouts:
            raise PipelineConfigError(
                f"stage {self.spec.name!r} uses the student's rollouts of style {style!r}, but no `rollout` stage "
                f"sampled that style earlier in pipeline.order"
            )
        return self.rollouts[style]

    def store(self, setting: str = "store", sequences: str = "labels") -> Path:
        """The store named by ``settings.<setting>``: ``auto`` is the latest one scored for the stage's style
        on ``sequences`` (its label sequences, or the student's rollouts)."""
        given = self.settings.get(setting)
        if given not in (None, "auto"):
            return Path(str(given))
        if len(self.styles) != 1:
            raise PipelineConfigError(
                f"stage {self.spec.name!r} reads a teacher store, which covers one style; got {self.styles}"
            )
        style = self.styles[0]
        if (style, sequences) not in self.stores:
            what = "rollout" if sequences == "rollouts" else "label"
            fix = (
                "a `rollout` stage, then a `score` stage with sequences: rollouts,"
                if what == "rollout"
                else ("a `score` stage")
            )
            raise PipelineConfigError(
                f"stage {self.spec.name!r} ({self.spec.kind}, style={style!r}) has no teacher store of its {what} "
                f"sequences: put {fix} scoring style {style!r} before it, or set "
                f"pipeline.stages.{self.spec.name}.{setting}=<path>"
            )
        return self.stores[(style, sequences)]
