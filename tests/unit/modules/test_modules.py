"""SFTModule and KDModule: the fused path (default) equals the plain path on real batches."""

from __future__ import annotations

import functools

import pytest
import torch

from kdpipe.data.collate import Collator, KDCollator
from kdpipe.modules import KDModule, SFTModule
from kdpipe.store.reader import TeacherStore
from tests.helpers import encoded, tiny_llama, write_store

OPT = functools.partial(torch.optim.AdamW, lr=1e-3)


def grads_of(module, loss):
    params = [p for p in module.model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_fused_equals_plain(tokenizer, packing):
    batch = Collator(tokenizer.pad_token_id, packing=packing)(encoded(tokenizer)[:6])
    model = tiny_llama(tokenizer).double()
    fused, plain = SFTModule(model, OPT, loss_impl="fused", chunk_size=7), SFTModule(model, OPT, loss_impl="plain")
    lf, lp = fused.loss(batch), plain.loss(batch)
    assert torch.allclose(lf, lp.double(), rtol=1e-6)
    for a, b in zip(grads_of(fused, lf), grads_of(plain, lp)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", ["fkl", "jsd", "tvd"])
def test_kd_fused_equals_plain_with_a_real_store(tokenizer, tmp_path, divergence):
    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    batch = KDCollator(Collator(tokenizer.pad_token_id), TeacherStore(tmp_path / "store"))(examples[:6])
    model = tiny_llama(tokenizer).double()
    opts = {"divergence": divergence, "ce_weight": 0.3, "temperature": 2.0, "beta": 0.4}
    logged = {}
    modules = [KDModule(model, OPT, loss=opts, loss_impl=impl, chunk_size=5) for impl in ("fused", "plain")]
    for module in modules:  # capture what each path would log instead of needing a Trainer
        module.log_dict = lambda d, module=module, **kw: logged.setdefault(module.loss_impl, {}).update(d)
        module.log = lambda name, value, module=module, **kw: logged.setdefault(module.loss_impl, {}).update(
            {name: value}
        )
    lf, lp = (m.training_step(batch, 0) for m in modules)
    assert torch.allclose(lf, lp.double(), rtol=1e-6)
    for a, b in zip(grads_of(modules[0], lf), grads_of(modules[1], lp)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    for key in ("kd/teacher_topk_mass", "kd/top1_agreement", "train/divergence", "kd/divergence_L2"):
        assert torch.allclose(
            torch.as_tensor(logged["fused"][key]).double(), torch.as_tensor(logged["plain"][key]).double(), rtol=1e-5
        ), key


def test_validation_loss_is_the_same_on_both_paths(tokenizer):
    batch = Collator(tokenizer.pad_token_id)(encoded(tokenizer)[:6])
    model = tiny_llama(tokenizer)
    values = []
    for impl in ("fused", "plain"):
        module = SFTModule(model, OPT, loss_impl=impl)
        with torch.no_grad():
            module.validation_step(batch, 0)
        values.append(module._val_sums[0])
    assert torch.allclose(values[0], values[1], rtol=1e-5)
