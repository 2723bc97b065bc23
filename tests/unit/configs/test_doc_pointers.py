"""Every docs page a config's comments point to exists (``configs/data/jsonl_chat.yaml`` named a draft once)."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
POINTER = re.compile(r"\bdocs/[\w./-]+\.md\b")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_docs_pages_named_in_configs_exist(config):
    missing = [page for page in POINTER.findall(config.read_text()) if not (REPO / page).is_file()]
    assert not missing, f"{config.relative_to(REPO)} points to missing {missing}"


def test_the_chat_data_config_points_to_the_data_page():
    assert "docs/data.md" in (REPO / "configs" / "data" / "jsonl_chat.yaml").read_text()
