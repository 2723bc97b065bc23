"""``kdpipe-train``: run a stage pipeline. A thin Hydra entry point around :func:`train`.

kdpipe-train                                   # the default pipeline on the built-in task
kdpipe-train pipeline=tiny logger=csv          # another pipeline, CSV logs
kdpipe-train 'pipeline.order=[teacher_sft,sft_fast]'
kdpipe-train resume=logs/runs/2026-11-23_10-00-00   # continue an interrupted run
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kdpipe.pipeline.runner import run_pipeline
from kdpipe.pipeline.spec import PipelineConfigError
from kdpipe.utils.paths import config_dir
from kdpipe.utils.quiet import quiet_third_party


def train(cfg: DictConfig) -> dict:
    """Run the pipeline ``cfg`` describes and return the results payload. No global side effects."""
    return run_pipeline(cfg)


def final_metric(payload: dict, name: str) -> float | None:
    """The named metric of the last stage that reported it (what a sweeper optimises)."""
    for stage in reversed(payload["stages"]):
        if name in stage["metrics"]:
            return float(stage["metrics"][name])
    return None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    try:
        payload = train(cfg)
    except PipelineConfigError as err:
        print(f"kdpipe-train: config error: {err}", file=sys.stderr)
        sys.exit(2)
    return final_metric(payload, str(cfg.get("optimized_metric", "accuracy")))


if __name__ == "__main__":
    main()
