"""``trainer.precision: auto``: a configured precision is kept; the device decides on a GPU, an NPU and a CPU
without a bf16 fast path; elsewhere on a CPU the probe decides, with a margin for exact fp32; the probe works on
a copy and within its budget; a recorded choice is reused without probing."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from kdpipe.lightning import precision as P
from kdpipe.modules import KDModule, SFTModule
from kdpipe.modules.optim import adamw
from tests.helpers import tiny_llama


def no_probe(*args, **kwargs):
    pytest.fail("probed")


def no_batch() -> dict:
    pytest.fail("built a probe batch")


def cfg(**trainer):
    return OmegaConf.create({"precision": "auto", "accelerator": "cpu", **trainer})


def probed(seconds: dict[str, float]):
    return lambda *a, **k: P.ProbeResult(seconds, rounds=3, wall_s=0.5)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with a bf16 fast path (AVX-512 or AMX), whatever this machine has."""
    monkeypatch.setattr(P, "cpu_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_configured_precision_is_kept_and_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(P, "probe_cpu_precision", no_probe)
    for given in ("32-true", "bf16-mixed", None):
        assert P.resolve_precision(cfg(precision=given), None, no_batch) == (given, {})
        assert P.identity_precision(cfg(precision=given)) == given


@pytest.mark.parametrize(
    ("seconds", "chosen"),
    [
        ({"32-true": 1.0, "bf16-mixed": 0.5}, "bf16-mixed"),  # clearly faster: bf16
        ({"32-true": 1.0, "bf16-mixed": 0.9}, "bf16-mixed"),  # 1.11x: past the margin
        ({"32-true": 1.0, "bf16-mixed": 0.97}, "32-true"),  # 1.03x: within the margin, exact fp32
        ({"32-true": 0.1, "bf16-mixed": 1.3}, "32-true"),  # a CPU that emulates bf16
    ],
)
def test_auto_on_a_bf16_cpu_takes_the_measured_faster_precision(monkeypatch, bf16_cpu, seconds, chosen):
    monkeypatch.setattr(P, "probe_cpu_precision", probed(seconds))
    precision, info = P.resolve_precision(cfg(), None, dict)
    assert precision == chosen
    assert info["precision_chosen_by"] == "probe" and info["precision_device"] == "cpu"
    assert (info["probe_s_per_step_fp32"], info["probe_s_per_step_bf16"]) == (seconds["32-true"], seconds["bf16-mixed"])
    assert info["probe_rounds"] == 3 and info["probe_bf16_margin"] == P.BF16_MARGIN
    assert P.identity_precision(cfg()) == P.MEASURED  # the probe decides: not known before the stage runs


def test_the_margin_is_bf16_more_than_5_percent_faster():
    assert P.choose({"32-true": 1.06, "bf16-mixed": 1.0}) == "bf16-mixed"
    assert P.choose({"32-true": 1.04, "bf16-mixed": 1.0}) == "32-true"
    assert P.choose({"32-true": 1.0}) == "32-true"  # bf16 not offered


def test_a_cpu_without_a_bf16_fast_path_is_fp32_by_device(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(P, "probe_cpu_precision", no_probe)
    for accelerator in ("cpu", "auto"):
        precision, info = P.resolve_precision(cfg(accelerator=accelerator), None, no_batch)
        assert precision == "32-true" and info["precision_chosen_by"] == "device"
        assert P.identity_precision(cfg(accelerator=accelerator)) == "32-true"  # the same identity as 32-true
    assert P.cpu_candidates() == ("32-true",)


@pytest.mark.parametrize(("bf16", "chosen"), [(True, "bf16-mixed"), (False, "16-mixed")])
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_auto_on_a_gpu_is_chosen_by_the_device(monkeypatch, accelerator, bf16, chosen):
    monkeypatch.setattr(P, "probe_cpu_precision", no_probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    precision, info = P.resolve_precision(cfg(accelerator=accelerator), None, no_batch)
    assert (precision, info["precision_chosen_by"], info["precision_device"]) == (chosen, "device", "cuda")
    assert P.identity_precision(cfg(accelerator=accelerator)) == chosen


def test_a_gpu_that_only_emulates_bf16_gets_fp16(monkeypatch):
    """torch's ``is_bf16_supported()`` says True on a pre-Ampere GPU that emulates bf16: native support counts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert P.resolve_precision(cfg(accelerator="gpu"), None, no_batch)[0] == "16-mixed"


def test_auto_on_an_npu_keeps_the_configs_plugin_else_asks_torch_npu(monkeypatch):
    monkeypatch.setattr(P, "probe_cpu_precision", no_probe)
    plugin = {"_target_": "lightning.pytorch.plugins.precision.MixedPrecision", "precision": "bf16-mixed"}
    precision, info = P.resolve_precision(cfg(accelerator="npu", plugins=[plugin]), None, no_batch)
    assert precision is None and info["precision_device"] == "npu"  # the plugin (bf16 autocast on npu) stands
    for bf16, chosen in ((True, "bf16-mixed"), (False, "16-mixed")):
        monkeypatch.setattr(P, "npu_bf16_supported", lambda bf16=bf16: bf16)
        assert P.resolve_precision(cfg(accelerator="npu"), None, no_batch)[0] == chosen


def tiny_module(vocab: int = 50) -> SFTModule:
    return SFTModule(tiny_llama(vocab_size=vocab), optimizer=partial(adamw, lr=1e-3))


def tiny_batch(rows: int = 2, width: int = 8) -> dict:
    ids = torch.randint(0, 50, (rows, width), generator=torch.Generator().manual_seed(1))
    return {"ids": list(range(rows)), "input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def test_the_probe_times_real_steps_on_a_copy_and_leaves_the_module_and_rng_as_they_were():
    module = tiny_module().eval()
    batch = tiny_batch()
    module.loss(batch).backward()  # some gradients already there
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    rng = torch.get_rng_state()
    result = P.probe_cpu_precision(module, batch, clip=1.0, max_rounds=2)
    assert set(result.seconds) == set(P.CPU_CANDIDATES) and all(t > 0 for t in result.seconds.values())
    assert result.rounds <= 2 and result.wall_s > 0
    assert not module.training
    assert torch.equal(torch.get_rng_state(), rng)
    for name, param in module.named_parameters():
        assert torch.equal(param, weights[name])
        assert torch.equal(param.grad, grads[name])


def test_the_probe_runs_a_kd_modules_own_training_step_without_a_trainer(recwarn):
    module = KDModule(tiny_llama(vocab_size=50), optimizer=partial(adamw, lr=1e-3), loss={"ce_weight": 0.5})
    batch = tiny_batch()
    k = 4
    logprobs = torch.log_softmax(torch.randn(2, 8, k + 1), dim=-1)
    batch.update(
        levels=torch.tensor([1, 2]),
        topk_ids=torch.randint(0, 50, (2, 8, k)),
        topk_logprobs=logprobs[..., :k],
        tail_logprob=logprobs[..., k],
        has_teacher=torch.ones(2, 8, dtype=torch.bool),
    )
    result = P.probe_cpu_precision(module, batch, max_rounds=1)
    assert set(result.seconds) == set(P.CPU_CANDIDATES)
    assert not [w for w in recwarn if "self.log" in str(w.message)]  # its logging without a Trainer is quiet


def fake_steps(monkeypatch, seconds: dict[str, list[float]]) -> list[str]:
    """Step times by precision, in order (the last repeats); returns the precisions in the order they ran."""
    ran: list[str] = []

    def step(module, optimizer, batch, precision, clip):
        ran.append(precision)
        times = seconds[precision]
        return times[min(ran.count(precision), len(times)) - 1]

    monkeypatch.setattr(P, "_train_step", step)
    return ran


def test_the_probe_warms_up_interleaves_and_keeps_each_candidates_fastest_step(monkeypatch):
    ran = fake_steps(monkeypatch, {"32-true": [9.0, 0.5, 0.3, 0.2, 0.25], "bf16-mixed": [0.9, 0.4, 0.35, 0.3]})
    result = P.probe_cpu_precision(tiny_module(), tiny_batch(), budget_s=60, max_rounds=3)
    fp32, bf16 = "32-true", "bf16-mixed"
    # an untimed first step, a warm-up each, then 3 rounds in alternating order
    assert ran == [fp32, fp32, bf16, fp32, bf16, bf16, fp32, fp32, bf16]
    assert result.rounds == 3 and result.seconds == {"32-true": 0.2, "bf16-mixed": 0.3}


def test_the_probe_stops_at_its_budget_after_one_round(monkeypatch):
    fake_steps(monkeypatch, {"32-true": [1.0], "bf16-mixed": [1.0]})
    assert P.probe_cpu_precision(tiny_module(), tiny_batch(), budget_s=0.0).rounds == 1


def test_a_hopeless_candidate_is_not_timed_beyond_its_warm_up(monkeypatch):
    """A CPU that emulates bf16 (several times slower) costs one bf16 step, not rounds of them."""
    ran = fake_steps(monkeypatch, {"32-true": [0.1], "bf16-mixed": [0.7]})
    result = P.probe_cpu_precision(tiny_module(), tiny_batch())
    assert ran.count("bf16-mixed") == 1 and result.rounds == 0
    assert result.seconds == {"32-true": 0.1, "bf16-mixed": 0.7} and P.choose(result.seconds) == "32-true"


def test_the_probe_batch_is_the_stages_shape_drawn_at_random():
    class Example:
        def __init__(self, n):
            self.input_ids = [0] * n

    examples = [Example(n) for n in range(1, 21)]
    picked = P.probe_batch(list, examples, batch_size=4)
    assert len(picked) == 4 and picked == P.probe_batch(list, examples, batch_size=4)  # seeded
    assert [len(e.input_ids) for e in picked] != [1, 2, 3, 4]  # not the first (shortest) examples
    packed = P.probe_batch(list, examples, batch_size=4, max_tokens=30)  # packing: the token budget
    assert sum(len(e.input_ids) for e in packed) <= 30 and len(packed) >= 1
    with pytest.raises(ValueError, match="at least one"):
        P.probe_batch(list, [], batch_size=4)


def test_the_choice_is_recorded_and_a_resumed_stage_reuses_it_without_probing(monkeypatch, bf16_cpu, tmp_path):
    record = tmp_path / "precision.json"
    monkeypatch.setattr(P, "probe_cpu_precision", probed({"32-true": 1.0, "bf16-mixed": 0.5}))
    precision, info = P.resolve_stage_precision(cfg(), None, dict, record)
    assert precision == "bf16-mixed" and json.loads(record.read_text()) == {"precision": precision, "info": info}
    assert "bf16-mixed" in P.describe(precision, info) and "ms/step" in P.describe(precision, info)

    monkeypatch.setattr(P, "probe_cpu_precision", no_probe)  # the resumed stage: the machine may differ now
    monkeypatch.setattr(P, "cpu_bf16_supported", lambda: False)
    again, reused = P.resolve_stage_precision(cfg(), None, no_batch, record)
    assert again == "bf16-mixed" and reused == {**info, "precision_reused": True}
    assert "reused" in P.describe(again, reused)


def test_a_configured_precision_beats_a_recorded_auto_choice(monkeypatch, tmp_path):
    record = tmp_path / "precision.json"
    record.write_text(json.dumps({"precision": "bf16-mixed", "info": {"precision_chosen_by": "probe"}}))
    monkeypatch.setattr(P, "probe_cpu_precision", no_probe)
    assert P.resolve_stage_precision(cfg(precision="32-true"), None, no_batch, record) == ("32-true", {})
