"""What a stage is given: the whole config, its own settings and folder, where its model starts, the stage
order, and the artifacts earlier stages left (the latest teacher store of each (style, sequences, rollout
stage), each rollout stage's set)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.result import Slot
from kdpipe.pipeline.spec import StageSpec, rollout_stage, stage_data, stage_seed, stage_styles


@dataclass
class StageContext:
    """Everything a stage needs; every kind is a function ``(StageContext) -> StageResult``."""

    cfg: DictConfig
    spec: StageSpec
    run_dir: Path
    stage_dir: Path
    start_from: Path | None  # export of the previous stage of the same model; None: build it fresh
    stores: dict[Slot, Path] = field(default_factory=dict)  # (style, sequences, source) -> latest store
    rollouts: dict[str, Path] = field(default_factory=dict)  # rollout stage name -> the set it sampled
    order: Sequence[StageSpec] = ()  # every stage of the run, in order (this one at ``spec.index``)

    @property
    def settings(self) -> DictConfig:
        return self.spec.config

    @property
    def data(self) -> DictConfig:
        """The data config this stage reads: the run's ``data`` with the stage's own ``data`` keys over it."""
        return stage_data(self.cfg, self.settings)

    @property
    def model_cfg(self) -> DictConfig:
        return self.cfg.models[self.spec.model]

    @property
    def seed(self) -> int:
        """The stage's seed: ``settings.seed`` when pinned, else one hashed from the run's seed and the stage's
        name (:func:`~kdpipe.pipeline.spec.stage_seed`; a repeated stage's n-th entry: ``<name>#<n>``)."""
        pinned = self.settings.get("seed")
        return int(pinned) if pinned is not None else stage_seed(int(self.cfg.seed), self.spec.instance)

    @property
    def styles(self) -> list[str]:
        """The stage's response styles (``style``: one name or a list)."""
        return stage_styles(self.settings)

    def located(self) -> tuple[list[StageSpec], int]:
        """The stage order and this stage's place in it (alone, for a context built without the order)."""
        return (list(self.order), self.spec.index) if self.order else ([self.spec], 0)

    def rollout_source(self, setting: str, style: str | None) -> str:
        """The rollout stage that ``settings.<setting>`` names (``rollouts_from``, ``data_from``,
        ``onpolicy_from``), or by default the one rollout stage of ``style`` before this one."""
        return rollout_stage(*self.located(), style, self.settings.get(setting), setting).name

    def rollout_set(self, source: str) -> Path:
        """The rollout set the rollout stage ``source`` sampled earlier in this run."""
        if source not in self.rollouts:
            raise PipelineConfigError(
                f"stage {self.spec.name!r} reads the rollout set of stage {source!r}, which has not sampled one "
                f"in this run (finished rollout stages: {sorted(self.rollouts)})"
            )
        return self.rollouts[source]

    @property
    def data_from(self) -> str | None:
        """A training stage's ``data_from``: the rollout stage whose kept responses it trains on as labels
        (None: the data config's training split)."""
        given = self.settings.get("data_from")
        return None if given is None else self.rollout_source("data_from", self.single_style("data_from"))

    def single_style(self, what: str) -> str:
        if len(self.styles) != 1:
            raise PipelineConfigError(
                f"stage {self.spec.name!r}: {what} covers one response style; the stage has {self.styles}"
            )
        return self.styles[0]

    def label_slot(self) -> Slot:
        """Where the teacher signal on this stage's label pool is: the data's labels, or its ``data_from``
        rollout set."""
        style = self.single_style("a teacher store")
        source = self.data_from
        return (style, "labels", None) if source is None else (style, "rollouts", source)

    def store(self, setting: str = "store", slot: Slot | None = None) -> Path:
        """The store named by ``settings.<setting>``: ``auto`` is the latest one scored for ``slot`` (default:
        the stage's label pool, :meth:`label_slot`)."""
        given = self.settings.get(setting)
        if given not in (None, "auto"):
            return Path(str(given))
        style, sequences, source = slot or self.label_slot()
        if (style, sequences, source) not in self.stores:
            fix = (
                f"a `score` stage with sequences: rollouts and rollouts_from: {source}"
                if sequences == "rollouts"
                else "a `score` stage"
            )
            what = f"the rollout set of stage {source!r}" if sequences == "rollouts" else "its label sequences"
            raise PipelineConfigError(
                f"stage {self.spec.name!r} ({self.spec.kind}, style={style!r}) has no teacher store of {what}: "
                f"put {fix} scoring style {style!r} before it, or set pipeline.stages.{self.spec.name}.{setting}=<path>"
            )
        return self.stores[(style, sequences, source)]
