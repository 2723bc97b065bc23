"""Encoding, label masking, batching (padding and packing) and the DataModule."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdpipe.data.arith import generate_split
from kdpipe.data.collate import Collator
from kdpipe.data.datamodule import PostTrainDataModule
from kdpipe.data.encode import encode_example
from kdpipe.losses import token_cross_entropy
from kdpipe.types import IGNORE_INDEX
from tests.helpers import tiny_llama

EXAMPLE = {
    "id": "x1",
    "level": 3,
    "prompt": "3+4*5",
    "answer": "23",
    "responses": {"reasoning": "4*5=20\n3+20=23\nAnswer: 23", "fast": "Answer: 23"},
}


@pytest.mark.parametrize("style", ["reasoning", "fast"])
def test_labels_cover_exactly_the_assistant_response_shifted(tokenizer, style):
    enc = encode_example(tokenizer, EXAMPLE, style)
    assert len(enc.input_ids) == len(enc.labels)
    targets = [t for t in enc.labels if t != IGNORE_INDEX]
    # the learned tokens are the response plus the end-of-turn token, nothing from the prompt
    assert tokenizer.decode(targets) == EXAMPLE["responses"][style] + tokenizer.eos_token
    for t, label in enumerate(enc.labels):
        if label != IGNORE_INDEX:
            assert label == enc.input_ids[t + 1]  # position t predicts token t+1
    first = next(t for t, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(enc.input_ids[: first + 1]).endswith("assistant\n")


def test_max_length_drops_long_examples(tokenizer):
    assert encode_example(tokenizer, EXAMPLE, "reasoning", max_length=10) is None


def test_padding_collator_pads_right_and_masks(tokenizer):
    encs = [encode_example(tokenizer, EXAMPLE, s) for s in ("reasoning", "fast")]
    batch = Collator(tokenizer.pad_token_id)(encs)
    n0, n1 = len(encs[0].input_ids), len(encs[1].input_ids)
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"][1].sum() == n1
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n1:] == tokenizer.pad_token_id).all()


def test_packed_batch_gives_the_same_loss_as_a_padded_one(tokenizer):
    """Packing must not let tokens attend across examples: per-token losses equal the padded ones."""
    exs = generate_split("val", 3, seed=0)[:6]
    encs = [encode_example(tokenizer, e, "reasoning") for e in exs]
    model = tiny_llama(tokenizer)
    padded = Collator(tokenizer.pad_token_id)(encs)
    packed = Collator(tokenizer.pad_token_id, packing=True)(encs)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        lp = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        # no cache: transformers only detects packed rows from position_ids when there is no KV cache
        lk = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    loss_padded = token_cross_entropy(lp.double(), padded["labels"])
    loss_packed = token_cross_entropy(lk.double(), packed["labels"])
    assert torch.allclose(loss_padded, loss_packed, rtol=1e-5, atol=1e-6)
    # and per position: the logits of each packed example equal its padded row
    offset = 0
    for row, e in enumerate(encs):
        n = len(e.input_ids)
        assert torch.allclose(lk[0, offset : offset + n], lp[row, :n], atol=1e-5)
        offset += n


def data_cfg(**kw):
    base = dict(
        source="arith",
        seed=0,
        levels=[1, 2, 3, 4, 5],
        max_value=99,
        n_train_per_level=30,
        n_val_per_level=4,
        n_test_per_level=4,
        max_length=128,
        packing=False,
        max_tokens=256,
        num_workers=0,
    )
    return OmegaConf.create({**base, **kw})


def test_datamodule_serves_the_curriculum_plan(tokenizer):
    dm = PostTrainDataModule(
        tokenizer,
        data_cfg(),
        "reasoning",
        OmegaConf.create({"scorer": "level", "schedule": "sorted"}),
        batch_size=8,
        num_batches=5,
        seed=0,
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    levels = [int(b["levels"].max()) for b in batches]
    assert levels == sorted(levels)  # easy to hard
    assert batches[0]["input_ids"].shape[0] == 8
    val = next(iter(dm.val_dataloader()))
    assert "attention_mask" in val


def test_datamodule_packing_respects_the_token_budget(tokenizer):
    dm = PostTrainDataModule(
        tokenizer,
        data_cfg(packing=True, max_tokens=200),
        "reasoning",
        OmegaConf.create({"scorer": "level", "schedule": "random"}),
        batch_size=8,
        num_batches=6,
        seed=0,
    )
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 200
        assert (batch["position_ids"][0] == 0).sum() == len(batch["ids"])
