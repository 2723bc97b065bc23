"""Teacher scoring as a library function (kdpipe.engines.scoring): a content-addressed store, written once and
then reused, and the caller told which."""

from __future__ import annotations

import pytest

from kdpipe.engines import score_teacher
from kdpipe.store.reader import TeacherStore
from tests.helpers import encoded, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_store_is_scored_once_then_reused_and_the_caller_is_told(tokenizer, tmp_path):
    model, examples = tiny_llama(tokenizer), encoded(tokenizer, n_per_level=1, style="fast")
    settings = {"style": "fast", "split": "val", "store_root": tmp_path, "k": 4, "batch_size": 4, "shard_size": 2}
    reused = []
    path = score_teacher(model, tokenizer, examples, **settings, on_reuse=lambda: reused.append(True))
    assert not reused and path.parent == tmp_path and path.name.startswith("fast-val-k4-")
    store = TeacherStore(path)
    assert len(store) == len(examples) and store.k == 4
    written = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert score_teacher(model, tokenizer, examples, **settings, on_reuse=lambda: reused.append(True)) == path
    assert reused == [True]
    assert score_teacher(model, tokenizer, examples, **settings) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == written  # reused, not rewritten
    other = score_teacher(model, tokenizer, examples, **{**settings, "k": 2}, on_reuse=lambda: reused.append(True))
    assert other != path and reused == [True]  # another k: another store, scored
