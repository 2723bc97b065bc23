"""Loggers for the stage kinds that run no Trainer and evaluate nothing (``score``, ``rollout``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from kdpipe.lightning.loggers import log_config, log_results, stage_loggers
from kdpipe.pipeline.result import StageResult
from kdpipe.pipeline.stages.context import StageContext
from kdpipe.pipeline.stages.fit import run_config

StageKind = Callable[[StageContext], StageResult]


def with_loggers(run_kind: StageKind) -> StageKind:
    """``run_kind`` with the stage's loggers (rank 0's): its config before it runs, its metrics after, under
    ``stage/`` (e.g. ``stage/fast_store/label_tokens`` for a score stage, ``stage/kept`` for a rollout)."""

    @functools.wraps(run_kind)
    def run(ctx: StageContext) -> StageResult:
        with stage_loggers(ctx.cfg.get("logger"), ctx.run_dir, ctx.stage_dir, ctx.spec.dirname) as loggers:
            log_config(loggers, run_config(ctx))
            result = run_kind(ctx)
            log_results(loggers, result.metrics, 0)
        return result

    return run
