"""``kdpipe-cache``: write a teacher store for a teacher export and dataset, outside a pipeline.

    kdpipe-cache teacher_path=logs/runs/<run>/01_teacher_sft/export 'score.styles=[fast]' score.k=32

The store lands under ``score.store_root`` (default ``logs/stores/``) with a content-derived name, so a
pipeline's ``score`` stage over the same teacher, data, k and temperature finds and reuses it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from kdpipe.accelerators import register as register_accelerators
from kdpipe.pipeline.spec import PipelineConfigError, StageSpec
from kdpipe.pipeline.stages import StageContext, check_trainer_device, run_score
from kdpipe.utils.paths import config_dir
from kdpipe.utils.quiet import quiet_third_party


def cache(cfg: DictConfig) -> dict:
    """Score ``cfg.teacher_path`` (or the configured teacher model) into stores; returns the score metrics."""
    check_trainer_device(cfg.trainer)  # e.g. trainer=npu without torch_npu or CANN: fail before loading anything
    start_from = None
    if cfg.get("teacher_path"):
        start_from = Path(str(cfg.teacher_path)).expanduser().resolve()
        if not start_from.is_dir():
            raise PipelineConfigError(f"teacher_path {start_from} is not a directory (expected an HF export)")
    elif cfg.models.teacher.source != "pretrained":
        raise PipelineConfigError("give teacher_path=<export dir>, or a pretrained teacher (model.source=pretrained)")
    settings = OmegaConf.merge(cfg.score, {"kind": "score", "model": "teacher"})
    run_dir = Path(str(cfg.paths.run_dir)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.seed = int(cfg.get("seed", 0))
    ctx = StageContext(cfg, StageSpec(0, "score", settings), run_dir, run_dir, start_from)
    metrics, _ = run_score(ctx)
    for style, path in metrics["stores"].items():
        info = metrics[f"{style}_store"]
        Console().print(
            f"{style}: {path} ({info['examples']} examples, {info['label_tokens']} label tokens, "
            f"{info['bytes_per_entry']:.3f} bytes/entry{', reused' if info['reused'] else ''})"
        )
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="cache")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    register_accelerators()
    try:
        cache(cfg)
    except PipelineConfigError as err:
        print(f"kdpipe-cache: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
