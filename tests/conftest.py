"""Shared fixtures: the built-in tokenizer and configs composed from the real ``configs/``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from kdpipe.models.tokenizer import build_char_tokenizer
from kdpipe.utils.paths import config_dir
from kdpipe.utils.quiet import quiet_third_party

quiet_third_party()

# the smallest real pipeline: tiny models and data, CSV logs, no progress bars
TINY = ["debug=fast", "logger=csv", "callbacks=none", "print_config=false"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread, so a busy machine does not make every op wait on a thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


def compose_cfg(overrides: list[str], run_dir: Path | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config exactly as ``kdpipe-train`` would, with the run directory pinned."""
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = compose(config_name=config_name, overrides=overrides)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory: the tiny pipeline config with extra overrides, running in a fresh tmp dir."""

    def make(*extra: str, run_dir: Path | None = None) -> DictConfig:
        # paths.root_dir too: shared outputs (teacher stores under logs/stores) stay in the test's tmp dir
        return compose_cfg([*TINY, f"paths.root_dir={tmp_path}", *extra], run_dir or tmp_path / "run")

    return make
