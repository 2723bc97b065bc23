"""The stage kinds: each a function ``(StageContext) -> StageResult`` in a file of its own."""

from __future__ import annotations

from collections.abc import Callable

from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.eval import run_eval
from kdpipe.pipeline.stages.kd import run_kd
from kdpipe.pipeline.stages.logged import with_loggers
from kdpipe.pipeline.stages.rollout import run_rollout
from kdpipe.pipeline.stages.score import run_score
from kdpipe.pipeline.stages.sft import run_sft

STAGE_KINDS: dict[str, Callable[[StageContext], StageResult]] = {
    "sft": run_sft,
    "kd": run_kd,
    "score": with_loggers(run_score),
    "rollout": with_loggers(run_rollout),
    "eval": run_eval,
}
# kinds that run no Lightning Trainer: rank 0 runs them and hands the other ranks its result
RANK_ZERO_KINDS = frozenset({"eval", "rollout"})
