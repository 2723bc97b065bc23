"""The teacher store: scoring, round trip, verification, mismatch refusal, crash-safe resumable writing."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from kdpipe.data.arith import generate_split
from kdpipe.data.collate import Collator, KDCollator
from kdpipe.data.encode import encode_example
from kdpipe.models.tokenizer import build_char_tokenizer
from kdpipe.modules.scorer import topk_signal
from kdpipe.store import codec
from kdpipe.store.reader import StoreError, StoreUnion, TeacherStore
from kdpipe.store.writer import MANIFEST, StoreWriter
from kdpipe.types import IGNORE_INDEX
from tests.helpers import REPO, STORE_K, encoded, run_cli, write_store

K = STORE_K


def test_topk_signal_matches_a_float64_reference():
    logits = torch.randn(5, 30) * 2
    labels = torch.tensor([0, 3, 7, 29, 11])
    ids, lps, tail, label_lp = topk_signal(logits, labels, k=6, temperature=2.0)
    ref = torch.log_softmax(logits.double() / 2.0, dim=-1)
    assert torch.equal(ids, ref.topk(6).indices)
    assert torch.allclose(lps.double(), ref.gather(-1, ids), atol=1e-6)
    assert torch.allclose(tail.double().exp(), 1 - ref.gather(-1, ids).exp().sum(-1), atol=1e-6)
    assert torch.allclose(label_lp.double(), ref.gather(-1, labels[:, None]).squeeze(-1), atol=1e-6)
    _, _, tail_full, _ = topk_signal(logits, labels, k=30)
    assert torch.isneginf(tail_full).all()  # k = V: no tail mass at all


def test_round_trip_by_example_id(tokenizer, tmp_path):
    examples = encoded(tokenizer)
    _, rows = write_store(tmp_path / "store", tokenizer, examples)
    store = TeacherStore(tmp_path / "store")
    assert len(store) == len(examples) and store.k == K
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert len(manifest["shards"]) == -(-len(examples) // 4)
    assert manifest["total_rows"] == sum(e.num_label_tokens for e in examples)
    for i in reversed(range(len(examples))):  # random access, any order
        got = store.get(examples[i].id)
        ids, lps, tail, label = rows[i]
        assert torch.equal(got.topk_ids.sort(-1).values, ids.sort(-1).values)  # exactly the teacher's ids
        assert (got.topk_ids[:, :-1] < got.topk_ids[:, 1:]).all()  # in id order
        # within the codec's error of the float32 teacher
        want = codec.align(ids, lps, got.topk_ids)
        assert torch.allclose(got.topk_logprobs.exp(), want.exp(), atol=2e-2)
        assert codec.kl_error(want, tail, got.topk_logprobs, got.tail_logprob).mean() <= 1e-3
        assert torch.allclose(got.label_logprob, label, rtol=1e-3, atol=1e-3)  # float16
    store.check_compatible(tokenizer, examples)
    assert manifest["codec"]["scheme"] == codec.DEFAULT_SCHEME == "sorted-ans-v2"


def test_a_v1_store_still_reads(tokenizer, tmp_path):
    """A store written before the v2 codec (format version 1, rowmax-pow4-v1 arrays) reads as it did."""
    examples = encoded(tokenizer)
    _, rows = write_store(tmp_path / "store", tokenizer, examples, scheme="rowmax-pow4-v1")
    manifest_path = tmp_path / "store" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest["codec"]) == {"vocab_size", "k", "id_dtype", "logprob_bits", "scheme"}  # as v1 wrote it
    manifest_path.write_text(json.dumps({**manifest, "version": 1}))
    store = TeacherStore(tmp_path / "store")
    for i, example in enumerate(examples):
        got = store.get(example.id)
        assert torch.equal(got.topk_ids, rows[i][0])  # v1 keeps the written order
        assert torch.allclose(got.topk_logprobs.exp(), rows[i][1].exp(), atol=2e-2)

    # a v1 store and a v2 store read as one union (e.g. an old label store beside a new on-policy store)
    write_store(tmp_path / "v2", tokenizer, examples[:3])
    union = StoreUnion([TeacherStore(tmp_path / "v2"), store])
    order = [examples[4].id, examples[0].id, examples[5].id]
    got, counts = union.get_many(order)
    assert counts == [examples[i].num_label_tokens for i in (4, 0, 5)]
    assert torch.equal(got.topk_ids[: counts[0]], rows[4][0])


def test_corrupted_shard_is_detected_and_named(tokenizer, tmp_path):
    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    shard = tmp_path / "store" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = TeacherStore(tmp_path / "store")
    store.get(examples[0].id)  # shard 0 is intact
    with pytest.raises(StoreError, match=r"checksum mismatch in shard shard-00001\.safetensors"):
        store.get(examples[5].id)
    with pytest.raises(StoreError, match="shard-00001"):
        TeacherStore(tmp_path / "store").verify_all()


def test_tokenizer_mismatch_is_refused_naming_the_difference(tokenizer, tmp_path):
    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    store = TeacherStore(tmp_path / "store")
    other = build_char_tokenizer()
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(StoreError, match="chat templates differ"):
        store.check_compatible(other, examples)
    bigger = build_char_tokenizer()
    bigger.add_tokens(["<tool>"])
    with pytest.raises(StoreError, match=r"vocab size 104 \(store\) != 105"):
        store.check_compatible(bigger, examples)


def test_dataset_mismatch_is_refused(tokenizer, tmp_path):
    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    store = TeacherStore(tmp_path / "store")
    store.check_compatible(tokenizer, examples[:5])  # a subset of the scored data is fine
    fast = encoded(tokenizer, style="fast")
    with pytest.raises(StoreError, match="tokenized differently"):
        store.check_compatible(tokenizer, fast)
    others = [encode_example(tokenizer, e, "reasoning") for e in generate_split("test", 2, seed=0)]
    with pytest.raises(StoreError, match="lacks"):
        store.check_compatible(tokenizer, others)


def test_writer_refuses_to_mix_two_stores_in_one_directory(tokenizer, tmp_path):
    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    spec = codec.make_spec(len(tokenizer), K + 1)
    with pytest.raises(ValueError, match="different teacher store"):
        StoreWriter(tmp_path / "store", examples, {"k": K + 1}, spec)


def test_kd_collator_puts_teacher_rows_at_label_positions(tokenizer, tmp_path):
    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    store = TeacherStore(tmp_path / "store")
    for packing in (False, True):
        batch = KDCollator(Collator(tokenizer.pad_token_id, packing=packing), store)(examples[:4])
        assert torch.equal(batch["has_teacher"], batch["labels"] != IGNORE_INDEX)
        offset = 0
        for i, e in enumerate(examples[:4]):
            row = 0 if packing else i
            base = offset if packing else 0
            positions = [base + t for t, label in enumerate(e.labels) if label != IGNORE_INDEX]
            rows = store.get(e.id)
            assert torch.equal(batch["topk_ids"][row, positions], rows.topk_ids)
            assert torch.equal(batch["topk_logprobs"][row, positions], rows.topk_logprobs)
            offset += len(e.input_ids)


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from kdpipe.store import writer as w
from tests.helpers import encoded, write_store
from kdpipe.models.tokenizer import build_char_tokenizer
kill_after = int(sys.argv[2])
original = w.StoreWriter._write_shard
written = []
def write_then_maybe_die(self, shard):
    original(self, shard)
    written.append(shard)
    if len(written) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
w.StoreWriter._write_shard = write_then_maybe_die
tok = build_char_tokenizer()
write_store(sys.argv[1], tok, encoded(tok))
"""


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_killed_writer_resumes_to_an_identical_store(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(KILL_SCRIPT.format(root=str(REPO)))
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_cli(sys.executable, script, reference, "0", cwd=tmp_path)
    killed = run_cli(sys.executable, script, crashed, "2", cwd=tmp_path, check=False)
    assert killed.returncode == -9  # SIGKILL mid-way
    assert not (crashed / MANIFEST).exists()
    assert len(list(crashed.glob("shard-*.safetensors"))) == 2
    run_cli(sys.executable, script, crashed, "0", cwd=tmp_path)
    ref_files = sorted(p.name for p in reference.iterdir())
    assert ref_files == sorted(p.name for p in crashed.iterdir())
    for name in ref_files:
        assert (reference / name).read_bytes() == (crashed / name).read_bytes(), name


def test_two_writers_racing_on_one_store_leave_one_complete_store(tokenizer, tmp_path, monkeypatch):
    """Two jobs scoring the same missing store at once (a parallel sweep): each writes every shard under a
    temp name of its own and renames it, so neither trips over the other and the result equals one writer's.
    The race is forced: both writers have written a shard's temp file before either renames it."""
    import threading

    from kdpipe.store import writer as writer_module

    examples = encoded(tokenizer)
    reference = tmp_path / "reference"
    write_store(reference, tokenizer, examples)
    both_written = threading.Barrier(2, timeout=30)
    real_save_file = writer_module.save_file

    def save_then_wait(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        both_written.wait()  # the other writer has now written (its) temp file for this shard too

    monkeypatch.setattr(writer_module, "save_file", save_then_wait)
    raced = tmp_path / "raced"
    errors: list[BaseException] = []

    def job() -> None:
        try:
            write_store(raced, tokenizer, examples)
        except Exception as err:  # collected: a thread's exception would not fail the test
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in raced.iterdir()) == sorted(p.name for p in reference.iterdir())  # no .tmp left
    for shard in reference.glob("shard-*.safetensors"):
        assert (raced / shard.name).read_bytes() == shard.read_bytes(), shard.name
