"""Every file in configs/ composes, resolves, and every pipeline validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS
from kdpipe.utils.paths import config_dir
from tests.conftest import compose_cfg

CONFIGS = Path(config_dir())
# how each group is selected on the command line (a group used under a package needs its package)
GROUP_OVERRIDE = {
    "model": "model@models.student",
    "stage": None,  # composed by train.yaml under stage_defaults.<kind>
    "hydra": None,  # Hydra's own settings, composed by every run
}


def group_options():
    for group_dir in sorted(p for p in CONFIGS.iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, option.stem


@pytest.mark.parametrize(("group", "option"), list(group_options()))
def test_every_config_file_composes(group, option, tmp_path):
    key = GROUP_OVERRIDE.get(group, group)
    if key is None:
        overrides = []
        if group == "stage":
            overrides = [f"stage@stage_defaults.{option}={option}"]
    else:
        overrides = [f"{key}={option}"]
    if group == "experiment" and option == "kd_divergences":
        overrides.append("models.teacher.path=/some/teacher/export")
    cfg = compose_cfg(overrides, tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    specs = resolve_stages(cfg, set(STAGE_KINDS))
    assert specs


def test_eval_config_composes(tmp_path):
    cfg = compose_cfg(["model_path=/some/export"], tmp_path, config_name="eval")
    OmegaConf.resolve(cfg)
    assert cfg.split == "test"


def test_cache_config_composes(tmp_path):
    cfg = compose_cfg(["teacher_path=/some/export"], tmp_path, config_name="cache")
    OmegaConf.resolve(cfg)
    assert cfg.score.kind == "score" and cfg.score.k >= 1


def test_default_pipeline_is_teacher_score_then_the_alternation(tmp_path):
    cfg = compose_cfg([], tmp_path)
    specs = resolve_stages(cfg, set(STAGE_KINDS))
    assert [(s.name, s.kind, s.model) for s in specs] == [
        ("teacher_sft", "sft", "teacher"),
        ("score", "score", "teacher"),
        ("sft_reasoning", "sft", "student"),
        ("kd_reasoning", "kd", "student"),
        ("sft_fast", "sft", "student"),
        ("kd_fast", "kd", "student"),
    ]
    styles = [s.config.get("style") for s in specs]
    assert styles == ["reasoning", None, "reasoning", "reasoning", "fast", "fast"]
    # the teacher is several times larger than the student
    t, s = cfg.models.teacher.arch, cfg.models.student.arch
    assert t.hidden_size * t.num_hidden_layers >= 4 * s.hidden_size * s.num_hidden_layers
