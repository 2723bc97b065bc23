"""``trainer.precision: auto``: a configured precision is kept, the device decides on a GPU, the probe on a CPU,
and the probe leaves the model as it found it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdpipe.lightning import precision as P
from tests.helpers import tiny_llama


def test_a_configured_precision_is_kept_and_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, **k: pytest.fail("probed"))
    for given in ("32-true", "bf16-mixed", None):
        assert P.resolve_precision(OmegaConf.create({"precision": given}), tiny_llama(), 4, 8) == (given, {})


@pytest.mark.parametrize(
    ("timings", "chosen"),
    [
        ({"32-true": 1.0, "bf16-mixed": 0.5}, "bf16-mixed"),  # clearly faster: bf16
        ({"32-true": 1.0, "bf16-mixed": 0.95}, "32-true"),  # within the margin: exact fp32
        ({"32-true": 0.1, "bf16-mixed": 1.3}, "32-true"),  # a CPU that emulates bf16
    ],
)
def test_auto_on_a_cpu_takes_the_measured_faster_precision(monkeypatch, timings, chosen):
    monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, **k: timings)
    cfg = OmegaConf.create({"precision": "auto", "accelerator": "cpu"})
    precision, info = P.resolve_precision(cfg, tiny_llama(), 4, 8)
    assert precision == chosen
    assert info == {
        "precision_chosen_by": "probe",
        "probe_s_per_step_fp32": timings["32-true"],
        "probe_s_per_step_bf16": timings["bf16-mixed"],
    }


def test_auto_on_a_gpu_is_chosen_by_the_device(monkeypatch):
    monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, **k: pytest.fail("probed"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = OmegaConf.create({"precision": "auto", "accelerator": "gpu"})
    assert P.resolve_precision(cfg, tiny_llama(), 4, 8) == ("16-mixed", {"precision_chosen_by": "device"})


def test_the_probe_leaves_weights_gradients_mode_and_rng_as_they_were():
    model = tiny_llama(vocab_size=50).eval()
    model(input_ids=torch.arange(6).view(1, 6)).logits.sum().backward()  # some gradients already there
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    timings = P.probe_cpu_precision(model, batch_size=2, seq_len=8, rounds=1)
    assert set(timings) == set(P.CPU_CANDIDATES) and all(t > 0 for t in timings.values())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name])
        assert torch.equal(param.grad, grads[name])
