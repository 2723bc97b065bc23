"""The shipped teacher of the built-in task: its recipe is what ``experiment=arith_teacher`` composes today,
its weights are the ones the recipe names, it knows both modes; retrained (slow), it reaches the same."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kdpipe.cli.teacher import ASSET, recipe_of, ship
from kdpipe.cli.train import train
from kdpipe.pipeline.spec import kind_defaults
from kdpipe.utils.io import read_json, sha256_file
from tests.helpers import compose_cfg

SHIPPED = read_json(ASSET / "recipe.json")


def test_the_shipped_weights_are_the_recipes_and_know_both_modes():
    assert sha256_file(ASSET / "model.safetensors") == SHIPPED["weights_sha256"]
    assert SHIPPED["accuracy"]["reasoning"] >= 0.95 and SHIPPED["accuracy"]["fast"] >= 0.85
    cfg = compose_cfg([])
    assert cfg.models.teacher.source == "pretrained" and cfg.models.teacher.path == "pkg://kdpipe/assets/arith_teacher"


def test_the_shipped_recipe_is_what_the_command_composes_today(tmp_path):
    now = recipe_of(compose_cfg(["experiment=arith_teacher"], run_dir=tmp_path))
    shipped = SHIPPED["recipe"]
    for part in ("model", "data", "seed", "precision"):
        assert now[part] == shipped[part], part
    # the stage's settings: every recorded key as it was; a key added since then must sit at its default
    defaults = OmegaConf.to_container(kind_defaults(compose_cfg([]), "sft"), resolve=False)
    for key, value in now["stage"].items():
        if key in shipped["stage"]:
            assert value == shipped["stage"][key], key
        else:
            assert value == defaults.get(key), f"{key}: added since the teacher shipped, and not at its default"


@pytest.mark.slow
def test_the_command_reproduces_the_shipped_teacher(tmp_path):
    """Retrain with the shipped command (~26 min on 2 CPU cores) and compare what it knows."""
    cfg = compose_cfg(["experiment=arith_teacher", f"paths.log_dir={tmp_path}/logs"], run_dir=tmp_path / "run")
    train(cfg)
    again = ship(tmp_path / "run", dest=tmp_path / "shipped")
    assert again["recipe"] == recipe_of(cfg)
    for mode, floor in (("reasoning", 0.95), ("fast", 0.85)):
        assert again["accuracy"][mode] >= floor, mode
        assert abs(again["accuracy"][mode] - SHIPPED["accuracy"][mode]) <= 0.03, mode
