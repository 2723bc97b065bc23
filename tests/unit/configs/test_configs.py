"""Every file in configs/ composes, resolves, and every pipeline validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS
from kdpipe.utils.paths import config_dir
from tests.helpers import compose_cfg

CONFIGS = Path(config_dir())
# how each group is selected on the command line (a group used under a package needs its package)
GROUP_OVERRIDE = {
    "model": "model@models.student",
    "stage": "+stage@pipeline.stages.probe",  # a stage kind's defaults, as a new entry of the stage library
    "hydra": None,  # Hydra's own settings, composed by every run
    "eval/metric": "+eval/metric@eval.metric",  # named by eval.metric=<name>; composable whole as well
}


def group_options():
    """(group, option) for every file of every config group, nested groups (``pipeline/preset``) included."""
    for option in sorted(CONFIGS.rglob("*.yaml")):
        group = option.parent.relative_to(CONFIGS).as_posix()
        if group != ".":
            yield group, option.stem


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")  # the submitit launchers
@pytest.mark.parametrize(("group", "option"), list(group_options()))
def test_every_config_file_composes(group, option, tmp_path):
    key = GROUP_OVERRIDE.get(group, group)
    overrides = [] if key is None else [f"{key}={option}"]
    if group == "stage":  # run the probe alone: it is validated against its kind like any stage
        overrides.append("pipeline.order=[probe]")
    if group == "experiment" and option == "kd_divergences":
        overrides.append("models.teacher.path=/some/teacher/export")
    cfg = compose_cfg(overrides, tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    specs = resolve_stages(cfg, set(STAGE_KINDS))
    assert specs
    if group == "stage":
        assert [(s.name, s.kind) for s in specs] == [("probe", option)]


def test_every_stage_kind_of_a_pipeline_is_composed_from_its_defaults(tmp_path):
    """Each named stage of the pipeline files has every key of its kind at compose time, so a stage key is
    overridden or swept without ``+``."""
    cfg = compose_cfg(["pipeline.stages.kd_fast.loss.divergence=jsd", "pipeline.stages.sft_fast.optimizer.lr=3e-4"])
    assert cfg.pipeline.stages.kd_fast.loss.divergence == "jsd"
    assert cfg.pipeline.stages.kd_fast.loss.tail == "bucket"  # the kind's default, in the composed config
    specs = {s.name: s.config for s in resolve_stages(cfg, set(STAGE_KINDS))}
    assert specs["sft_fast"].optimizer.lr == 3e-4 and specs["sft_fast"].optimizer._target_ == cfg.optimizer._target_
    assert specs["sft_reasoning"].optimizer.lr == cfg.optimizer.lr  # stage defaults: the top-level group's
    assert "kind" not in OmegaConf.load(CONFIGS / "pipeline" / "default.yaml").stages.kd_fast  # entries omit it


def test_eval_config_composes(tmp_path):
    cfg = compose_cfg(["model_path=/some/export"], tmp_path, config_name="eval")
    OmegaConf.resolve(cfg)
    assert cfg.split == "test"


def test_score_config_composes_with_the_score_stage_keys_at_top_level(tmp_path):
    cfg = compose_cfg(["teacher_path=/some/export"], tmp_path, config_name="score")
    OmegaConf.resolve(cfg)
    assert cfg.kind == "score" and cfg.k >= 1 and cfg.sequences == "labels"
    given = compose_cfg(["teacher_path=/some/export", "k=8", "styles=[fast]"], tmp_path, config_name="score")
    assert given.k == 8 and list(given.styles) == ["fast"]


def test_default_pipeline_is_the_teacher_in_both_modes_score_the_alternation_and_a_control(tmp_path):
    cfg = compose_cfg([], tmp_path)
    specs = resolve_stages(cfg, set(STAGE_KINDS))
    assert [(s.name, s.kind, s.model) for s in specs] == [
        ("teacher_reasoning_eval", "eval", "teacher"),
        ("teacher_fast_eval", "eval", "teacher"),
        ("score", "score", "teacher"),
        ("sft_reasoning", "sft", "student"),
        ("kd_reasoning", "kd", "student"),
        ("sft_fast", "sft", "student"),
        ("kd_fast", "kd", "student"),
        ("kd_fast_control", "sft", "student"),
    ]
    styles = [s.config.get("style") for s in specs]
    assert styles == ["reasoning", "fast", None, "reasoning", "reasoning", "fast", "fast", "fast"]
    assert specs[-1].config.control_of == "kd_fast" and specs[-1].config.max_steps == specs[-2].config.max_steps
    assert cfg.models.teacher.source == "pretrained" and cfg.data.label_noise.rate > 0
    # the teacher is several times larger than the student
    t, s = cfg.models.teacher.arch, cfg.models.student.arch
    assert t.hidden_size * t.num_hidden_layers >= 4 * s.hidden_size * s.num_hidden_layers
