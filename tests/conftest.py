"""Shared fixtures: the built-in tokenizer, one intra-op thread, and the tiny pipeline in a test's tmp dir.

Tests are in ``unit/`` (one module or function at a time, mirroring ``src/kdpipe/``) and ``integration/``
(whole pipelines, console scripts in subprocesses, several processes, sweeps). Helpers both use are in
``tests/helpers.py``.
"""

from __future__ import annotations

import pytest
import torch

from kdpipe.models.tokenizer import build_char_tokenizer
from kdpipe.utils.quiet import quiet_third_party
from tests.helpers import TinyConfig

quiet_third_party()


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


@pytest.fixture
def tiny_cfg(tmp_path) -> TinyConfig:
    """The tiny pipeline with every output in the test's tmp dir (the run in ``tmp_path / "run"``):
    ``tiny_cfg(*overrides, run_dir=...)`` composes it, ``tiny_cfg.args(*overrides)`` is its command line."""
    return TinyConfig(tmp_path)
