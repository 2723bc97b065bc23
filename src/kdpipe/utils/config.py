"""Printing and saving the composed config."""

from __future__ import annotations

from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from kdpipe.utils.io import atomic_write_text

# top-level sections shown first in the tree, in this order
PRINT_ORDER = ("pipeline", "models", "data", "curriculum", "optimizer", "scheduler", "trainer", "logger")


def config_tree(cfg: DictConfig, resolve: bool = True) -> rich.tree.Tree:
    """A rich tree with one branch per top-level config section."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in PRINT_ORDER if k in cfg] + [k for k in cfg if k not in PRINT_ORDER]
    for key in keys:
        branch = tree.add(str(key), style="bold")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=resolve) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    return tree


def print_and_save_config(cfg: DictConfig, run_dir: Path, print_tree: bool = True) -> None:
    """Print the config tree and save the resolved config as ``config.yaml`` and ``config_tree.log``."""
    tree = config_tree(cfg)
    if print_tree:
        rich.print(tree)
    with open(run_dir / "config_tree.log", "w") as f:
        rich.print(tree, file=f)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
