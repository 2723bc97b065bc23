"""The configs' AdamW: fused where torch has the kernel, and the same updates as torch's reference loop."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from kdpipe.modules.optim import adamw, wants_fused
from tests.helpers import REPO


def steps(opt_factory, dtype=torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)
    groups = [
        {"params": [p for p in net.parameters() if p.dim() > 1], "weight_decay": 0.1},
        {"params": [p for p in net.parameters() if p.dim() == 1], "weight_decay": 0.0},
    ]
    opt = opt_factory(groups)
    x = torch.randn(16, 6).to(dtype)
    for _ in range(5):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in net.parameters()]


def test_auto_fuses_on_cpu_and_matches_the_reference_loop():
    fused = steps(lambda g: adamw(g, lr=1e-2, betas=(0.9, 0.98)))
    reference = steps(lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.98), foreach=False), torch.float64)
    assert adamw([torch.nn.Parameter(torch.zeros(2))]).defaults["fused"] is True
    for a, b in zip(fused, reference):
        assert torch.allclose(a.double(), b, atol=1e-5)


@pytest.mark.parametrize(("fused", "want"), [("auto", True), (True, True), (False, False), (None, None)])
def test_fused_setting(fused, want):
    assert adamw([torch.nn.Parameter(torch.zeros(2))], fused=fused).defaults["fused"] is want


def test_auto_leaves_other_devices_and_integer_tensors_to_torch():
    assert not wants_fused([torch.zeros(2, device="meta")])
    assert not wants_fused([])


def test_the_optimizer_config_builds_it():
    cfg = OmegaConf.load(REPO / "configs" / "optimizer" / "adamw.yaml")
    opt = hydra.utils.instantiate(cfg)([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True and opt.defaults["lr"] == cfg.lr
