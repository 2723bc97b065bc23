"""Ascend NPU support, exercised with a CPU-backed stand-in for torch_npu (tests/npu_standin.py), not on hardware.

Registration, Trainer resolution from the real ``trainer=npu`` / ``trainer=npu_ddp`` configs, device stats and
parsing, the errors without torch_npu or CANN, SFT and KD steps, the score stage and generation through the
accelerator, and the fused loss's backend dispatch.
"""

from __future__ import annotations

import functools
import logging
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.callbacks import DeviceStatsMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

import kdpipe.losses.fused as fused_mod
from kdpipe.accelerators import (
    NPUAccelerator,
    NPUUnavailableError,
    is_npu_device,
    npu_device,
    npu_unavailable_reason,
    register,
    require_npu,
)
from kdpipe.cli.eval import evaluate
from kdpipe.cli.score import score
from kdpipe.cli.train import train
from kdpipe.data.collate import Collator, KDCollator
from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.trainer import inference_device, instantiate_trainer
from kdpipe.losses import fused_sparse_kd_loss, fused_sparse_kd_terms
from kdpipe.modules import KDModule, SFTModule
from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS, StageContext
from kdpipe.pipeline.stages.fit import evaluate_stage, optimizer_parts
from kdpipe.pipeline.stages.score import run_score
from kdpipe.store.reader import TeacherStore
from tests import npu_standin
from tests.helpers import compose_cfg, encoded, tiny_llama, write_store
from tests.unit.losses.test_fused import H, K, V, assert_close, fused, make_case, reference

pytestmark = pytest.mark.usefixtures("one_thread")
OPT = functools.partial(torch.optim.AdamW, lr=1e-2)
FIT = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture
def npu(monkeypatch):
    """The stand-in NPU (two devices) for one test; the fused loss's backend log starts afresh."""
    monkeypatch.setattr(fused_mod, "_ANNOUNCED", set())
    return npu_standin.install(monkeypatch)


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    monkeypatch.setattr(fused_mod, "_ANNOUNCED", set())
    caplog.set_level(logging.INFO, logger="kdpipe.losses.fused")
    return caplog


def trainer_cfg(*overrides: str, name: str = "npu"):
    return compose_cfg([f"trainer={name}", *overrides]).trainer


# --- registration and Trainer resolution ---------------------------------------------------------------------


def test_register_is_idempotent_and_imports_no_torch_npu(monkeypatch):
    # the raw entry, put back at the end (the registry's own .get() would instantiate the accelerator, and an
    # earlier test's entry point may have registered it already)
    saved = dict.pop(AcceleratorRegistry, "npu", None)
    try:
        finder = npu_standin.torch_npu_without_cann(monkeypatch)  # any import of torch_npu would be seen (and fail)
        register()
        register()
        assert AcceleratorRegistry["npu"]["accelerator"] is NPUAccelerator
        assert finder.attempts == 0 and "torch_npu" not in sys.modules

        class Other(NPUAccelerator):
            pass

        AcceleratorRegistry.register("npu", Other, override=True)
        register()  # someone else's "npu" stays
        assert AcceleratorRegistry["npu"]["accelerator"] is Other
    finally:
        dict.pop(AcceleratorRegistry, "npu", None)
        if saved is not None:
            dict.__setitem__(AcceleratorRegistry, "npu", saved)


def test_trainer_npu_config_resolves_strategy_precision_and_device(npu):
    trainer = instantiate_trainer(trainer_cfg(), logger=False)
    assert isinstance(trainer.accelerator, NPUAccelerator)
    assert type(trainer.strategy) is SingleDeviceStrategy
    assert trainer.strategy.root_device == torch.device("cpu") and npu.devices[0] == 0  # built by npu_device(0)
    plugin = trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and (plugin.precision, plugin.device) == ("bf16-mixed", "npu")
    assert trainer.num_devices == 1

    # a precision given as a value (a score stage's 32-true) replaces the config's plugin instead of clashing
    assert type(instantiate_trainer(trainer_cfg(), logger=False, precision="32-true").precision_plugin) is Precision
    mixed = instantiate_trainer(trainer_cfg("trainer.precision=bf16-mixed"), logger=False).precision_plugin
    assert isinstance(mixed, MixedPrecision) and mixed.device == "npu"  # not Lightning's CUDA default

    # the notebook way: register(), then the Trainer with the settings Lightning does not infer
    direct = L.Trainer(
        accelerator="npu",
        devices=[1],
        strategy=SingleDeviceStrategy(npu_device(1)),
        plugins=[MixedPrecision("bf16-mixed", "npu")],
        logger=False,
    )
    assert isinstance(direct.accelerator, NPUAccelerator) and npu.devices[-2:] == [1, 1]


def test_npu_without_an_explicit_strategy_is_rejected(npu):
    cfg = compose_cfg(["trainer.accelerator=npu"]).trainer  # the default trainer: strategy left to Lightning
    with pytest.raises(PipelineConfigError, match=r"explicit strategy.*trainer=npu_ddp"):
        instantiate_trainer(cfg, logger=False)


def test_npu_ddp_config_resolves_to_hccl_ddp(npu):
    trainer = instantiate_trainer(trainer_cfg("trainer.num_nodes=2", name="npu_ddp"), logger=False)
    strategy = trainer.strategy
    assert isinstance(trainer.accelerator, NPUAccelerator)
    assert type(strategy) is DDPStrategy and strategy._process_group_backend == "hccl"
    assert npu.devices == [0, 1] and len(strategy.parallel_devices) == 2  # devices=-1: both stand-in NPUs
    assert strategy.num_nodes == 2 and trainer.world_size == 4
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.device == "npu"


def test_device_stats_parsing_and_setup(npu):
    accelerator = NPUAccelerator()
    assert accelerator.get_device_stats(torch.device("cpu")) == npu.stats
    assert npu.called("memory_stats") == [(torch.device("cpu"),)]
    parse = NPUAccelerator.parse_devices
    assert [parse(1), parse(2), parse(-1), parse("-1"), parse("2"), parse("1,"), parse("0,1"), parse([1])] == [
        [0],
        [0, 1],
        [0, 1],
        [0, 1],
        [0, 1],
        [1],
        [0, 1],
        [1],
    ]
    for bad, match in ((3, "asked for 3 NPUs but 2"), ([2], r"\[2\] not visible"), ([0, 0], "repeat"), (0, "valid")):
        with pytest.raises(MisconfigurationException, match=match):
            parse(bad)
    assert NPUAccelerator.auto_device_count() == 2 and NPUAccelerator.is_available()
    assert len(NPUAccelerator.get_parallel_devices([1, 0])) == 2 and npu.devices[-2:] == [1, 0]
    accelerator.setup_device(torch.device("cpu"))  # the stand-in's NPU
    assert npu.called("set_device") == [(torch.device("cpu"),)]
    with pytest.raises(MisconfigurationException, match="should be an NPU"):
        accelerator.setup_device(torch.device("meta"))
    accelerator.teardown()
    assert npu.called("empty_cache")
    assert is_npu_device(torch.device("cpu"))


# --- clear errors ----------------------------------------------------------------------------------------------


def test_missing_torch_npu_fails_before_anything_runs(monkeypatch, tiny_cfg, tmp_path):
    npu_standin.torch_npu_missing(monkeypatch)
    register()
    pin = f'pip install "torch_npu=={torch.__version__.split("+")[0]}.*"'
    assert not NPUAccelerator.is_available() and NPUAccelerator.auto_device_count() == 0
    assert pin in npu_unavailable_reason() and "kdpipe[ascend]" in npu_unavailable_reason()
    with pytest.raises(NPUUnavailableError, match="torch_npu is not installed"):
        L.Trainer(accelerator="npu", logger=False)
    with pytest.raises(PipelineConfigError, match="torch_npu is not installed"):
        instantiate_trainer(trainer_cfg(), logger=False)
    # kdpipe-train: a config error before the run directory holds any stage
    with pytest.raises(PipelineConfigError, match=r"trainer.accelerator=npu: torch_npu is not installed"):
        train(tiny_cfg("trainer=npu"))
    assert not (tmp_path / "run").exists()
    # kdpipe-eval and kdpipe-score: before loading any model
    with pytest.raises(NPUUnavailableError, match="pip install"):
        evaluate(compose_cfg([f"model_path={tmp_path}", "device=npu"], config_name="eval"))
    with pytest.raises(PipelineConfigError, match="pip install"):
        score(compose_cfg(["trainer=npu", f"teacher_path={tmp_path}"], tmp_path / "score", config_name="score"))
    # the loss: an explicit npu backend without torch_npu says so; auto quietly stays generic
    (h, w, _), (ids, lp, tail, labels, _) = make_case(seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs torch_npu"):
        fused_sparse_kd_loss(h, w, ids, lp, tail, labels, ce_weight=0.5, backend="npu")


def test_cann_missing_says_to_source_set_env(monkeypatch):
    finder = npu_standin.torch_npu_without_cann(monkeypatch)
    assert not NPUAccelerator.is_available()  # harmless: no exception escapes
    reason = npu_unavailable_reason()
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in reason
    assert "libhccl.so" in reason and "ASCEND_HOME_PATH" in reason and finder.attempts >= 1
    register()
    with pytest.raises(NPUUnavailableError, match="cannot load its CANN libraries"):
        L.Trainer(accelerator="npu", logger=False)
    # another import failure (e.g. torch_npu on a CUDA build of torch) is not blamed on CANN
    finder.error = RuntimeError("Two accelerators cannot be used at the same time in PyTorch: npu and cuda.")
    reason = npu_unavailable_reason()
    assert "failed to import" in reason and "Two accelerators" in reason and "matches torch" in reason


def test_torch_npu_without_a_visible_device(monkeypatch):
    npu_standin.install(monkeypatch, count=0)
    assert not NPUAccelerator.is_available()
    with pytest.raises(NPUUnavailableError, match=r"no NPU is visible.*npu-smi info"):
        require_npu()


# --- training, scoring and generation through the accelerator ---------------------------------------------------


def fit_one_step(module, batch, tmp_path, name: str) -> L.Trainer:
    trainer = instantiate_trainer(
        trainer_cfg(),
        max_steps=1,
        logger=CSVLogger(tmp_path, name=name),
        callbacks=[DeviceStatsMonitor(cpu_stats=True)],  # the stand-in's NPU is the CPU: skip psutil's stats
        log_every_n_steps=1,
        **FIT,
    )
    module.model.train()  # as train_stage does
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return trainer


def test_one_sft_and_one_kd_step_through_the_accelerator(npu, tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdpipe.losses.fused")
    examples = encoded(tokenizer)[:8]
    collate = Collator(tokenizer.pad_token_id)
    write_store(tmp_path / "store", tokenizer, examples)
    batches = {
        "sft": collate(examples),
        "kd": KDCollator(collate, TeacherStore(tmp_path / "store"))(examples),
    }
    for kind, batch in batches.items():
        model = tiny_llama(tokenizer)
        before = [p.detach().clone() for p in model.parameters()]
        if kind == "sft":
            module = SFTModule(model, OPT)
        else:
            module = KDModule(model, OPT, loss={"divergence": "fkl", "ce_weight": 0.5})
        calls = len(npu.fused_ce_rows)
        trainer = fit_one_step(module, batch, tmp_path, kind)
        assert isinstance(trainer.accelerator, NPUAccelerator) and trainer.global_step == 1
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
        assert len(npu.fused_ce_rows) > calls  # the fused loss took the npu path inside the step
        header = (tmp_path / kind / "version_0" / "metrics.csv").read_text().splitlines()[0]
        assert "allocated_bytes.all.peak" in header  # DeviceStatsMonitor read torch.npu.memory_stats
    assert npu.called("set_device")  # setup_device ran
    assert "npu" in npu.autocast_types  # MixedPrecision("bf16-mixed", "npu") autocast, run as CPU autocast
    assert "fused KD loss: npu fused cross-entropy" in caplog.text


def test_score_stage_predicts_through_the_npu_trainer(npu, tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer=npu", "data.n_train_per_level=4", "pipeline.stages.score.styles=[fast]")
    spec = next(s for s in resolve_stages(cfg, set(STAGE_KINDS)) if s.kind == "score")
    stage_dir = tmp_path / "run" / spec.dirname
    stage_dir.mkdir(parents=True)
    result = run_score(StageContext(cfg, spec, tmp_path / "run", stage_dir, None))
    (fast,) = result.stores
    assert (fast.style, fast.sequences) == ("fast", "labels")
    store = TeacherStore(fast.path)
    assert int(store.manifest["total_rows"]) == result.metrics["fast_store"]["label_tokens"] > 0
    assert npu.called("set_device")  # Trainer.predict set up the NPU accelerator
    assert "npu" not in npu.autocast_types  # the stage's precision (32-true) replaced the config's bf16 plugin


def test_generation_runs_on_the_accelerator_device(npu, tiny_cfg, tmp_path, tokenizer):
    cfg = tiny_cfg(
        "trainer=npu",
        "trainer.strategy.device.index=1",
        "pipeline.stages.eval_student.eval.limit=3",
        "pipeline.stages.eval_student.eval.max_new_tokens=4",
    )
    assert inference_device(cfg.trainer) == torch.device("cpu") and npu.devices[-1] == 1  # the trainer's NPU
    spec = next(s for s in resolve_stages(cfg, set(STAGE_KINDS)) if s.kind == "eval")
    stage_dir = tmp_path / "run" / spec.dirname
    stage_dir.mkdir(parents=True)
    model = tiny_llama(tokenizer)
    asked = len(npu.devices)
    metrics = evaluate_stage(StageContext(cfg, spec, tmp_path / "run", stage_dir, None), model, tokenizer)
    assert metrics["num_examples"] == 3 and npu.devices[asked:] == [1]
    # kdpipe-eval device=npu:1 on an export
    export = tmp_path / "export"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    eval_cfg = compose_cfg(
        [
            f"model_path={export}",
            "data=arith",
            "device=npu:1",
            "limit=3",
            "max_new_tokens=4",
            f"output={tmp_path / 'e.json'}",
        ],
        config_name="eval",
    )
    asked = len(npu.devices)
    assert evaluate(eval_cfg)["metrics"]["num_examples"] == 3 and npu.devices[asked:] == [1]
    # without the NPU trainer, generation stays where it was
    assert inference_device(compose_cfg(["trainer=cpu"]).trainer) == torch.device("cpu")


# --- the fused loss's backend dispatch --------------------------------------------------------------------------


def test_auto_is_generic_off_the_npu(fresh_log):
    (h, w, b), (ids, lp, tail, labels, _) = make_case(seed=4, dtype=torch.float32)
    result = fused_sparse_kd_terms(h, w, ids, lp, tail, labels, lm_head_bias=b, ce_weight=0.5)
    assert result.backend == "generic"
    assert "fused KD loss: generic chunked (hidden states on cpu)" in fresh_log.text
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_sparse_kd_loss(h, w, ids, lp, tail, labels, backend="cuda")


NPU_CASES = [  # (k, temperature, ce_weight): the settings the fused CE op serves
    (K, 1.0, 0.4),  # one softmax serves CE and forward KL
    (K, 2.0, 0.4),  # the KL at T=2 on its own softmax, the CE from the op
    (K, 1.0, 1.0),  # CE only
    (V, 1.0, 0.5),  # the full vocabulary (no tail bin)
]


@pytest.mark.parametrize(("k", "temperature", "ce_weight"), NPU_CASES)
def test_npu_path_equals_generic_and_float64_reference(npu, fresh_log, k, temperature, ce_weight):
    leaves, teacher = make_case(seed=21, dtype=torch.float32, k=k)
    opts = dict(divergence="fkl", temperature=temperature, ce_weight=ce_weight)
    ref_loss, ref_grads = reference(leaves, teacher, **opts)
    gen_loss, gen_grads = fused(leaves, teacher, backend="generic", **opts)
    assert not npu.fused_ce_rows
    npu_loss, npu_grads = fused(leaves, teacher, **opts)  # auto, on the stand-in NPU
    n_labels = int((teacher[3] != -100).sum())
    assert npu.fused_ce_rows == [4] * (n_labels // 4) + [n_labels % 4]  # one fused call per chunk of 4 positions
    assert_close(npu_loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert_close(npu_loss, gen_loss.double(), rtol=1e-5, atol=1e-7)
    for got, want, gen in zip(npu_grads, ref_grads, gen_grads):
        assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert_close(got, gen.double(), rtol=1e-5, atol=1e-6)
    assert "fused KD loss: npu fused cross-entropy (torch_npu.npu_cross_entropy_loss)" in fresh_log.text


def test_npu_path_with_a_tiny_student_tail(npu):
    """A confident student (tail mass < 1e-3) takes the exact tail branch, which uses the lse the op implies."""
    leaves, (_, _, _, labels, has_teacher) = make_case(seed=13, dtype=torch.float32)
    h, w, b = leaves
    with torch.no_grad():
        h[0].mul_(25.0)
        teacher = torch.log_softmax((h.double() @ w.double().t() + b.double()) * 0.8, dim=-1)
        lp, ids = teacher.topk(K, dim=-1)
        tail = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
        q_tail = 1 - torch.softmax(h.double() @ w.double().t() + b.double(), -1).gather(-1, ids).sum(-1)
    assert (q_tail < 1e-3).any() and (q_tail > 1e-3).any()  # both branches are exercised
    teacher = (ids, lp.float(), tail.float(), labels, has_teacher)
    ref_loss, ref_grads = reference(leaves, teacher, divergence="fkl", ce_weight=0.2)
    loss, grads = fused(leaves, teacher, divergence="fkl", ce_weight=0.2)
    assert npu.fused_ce_rows
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_npu_path_for_plain_cross_entropy_and_the_op_row_limit(npu):
    g = torch.Generator().manual_seed(0)
    n = npu_standin.MAX_ROWS + 1  # more rows than one call of the op takes
    hidden = torch.randn(n, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g)
    result = fused_sparse_kd_terms(hidden, weight, None, None, None, labels, ce_weight=1.0)  # SFT's call
    assert result.backend == "npu" and npu.fused_ce_rows == [npu_standin.MAX_ROWS, 1]
    result.loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h64 @ w64.t(), labels)
    ref.backward()
    assert_close(result.loss.detach(), ref.detach(), rtol=1e-6)
    assert_close(hidden.grad, h64.grad, rtol=1e-4, atol=1e-9)
    assert_close(weight.grad, w64.grad, rtol=1e-4, atol=1e-7)


def test_dispatch_falls_back_where_the_fused_op_does_not_apply(npu, fresh_log):
    leaves, (ids, lp, tail, labels, _) = make_case(seed=5, dtype=torch.float32)
    h, w, b = leaves

    def backend(h=h, w=w, **opts) -> str:
        return fused_sparse_kd_terms(h, w, ids, lp, tail, labels, lm_head_bias=b, **opts).backend

    assert backend(divergence="rkl", ce_weight=0.5) == "generic"
    assert backend(divergence="fkl", tail="renormalize", ce_weight=0.5) == "generic"
    assert backend(divergence="fkl", ce_weight=0.0) == "generic"
    assert backend(h=h.double(), w=w.double(), ce_weight=0.5) == "generic"
    assert backend(divergence="jsd", ce_weight=0.5, backend="npu") == "generic"  # explicit npu falls back too
    assert not npu.fused_ce_rows
    for reason in ("divergence=rkl, tail=bucket: autograd", "ce_weight=0", "torch.float64 compute"):
        assert reason in fresh_log.text
    assert backend(ce_weight=0.5) == "npu" and npu.fused_ce_rows


def test_dispatch_without_the_fused_op(monkeypatch, fresh_log):
    npu_standin.install(monkeypatch, fused_ce=False)  # a torch_npu too old to have npu_cross_entropy_loss
    (h, w, _), (ids, lp, tail, labels, _) = make_case(seed=6, dtype=torch.float32)
    assert fused_sparse_kd_terms(h, w, ids, lp, tail, labels, ce_weight=0.5).backend == "generic"
    assert "this torch_npu has no npu_cross_entropy_loss" in fresh_log.text
    with pytest.raises(ValueError, match="needs torch_npu"):
        fused_sparse_kd_loss(h, w, ids, lp, tail, labels, ce_weight=0.5, backend="npu")


def test_generic_backend_is_bit_identical_with_or_without_the_npu(monkeypatch):
    leaves, teacher = make_case(seed=8, dtype=torch.float32)
    opts = dict(divergence="fkl", ce_weight=0.3, temperature=1.0)
    off_loss, off_grads = fused(leaves, teacher, **opts)  # no torch_npu: auto is generic
    npu_standin.install(monkeypatch)
    on_loss, on_grads = fused(leaves, teacher, backend="generic", **opts)
    assert torch.equal(off_loss, on_loss) and all(torch.equal(a, b) for a, b in zip(off_grads, on_grads))


def test_modules_pass_the_loss_backend(npu, tokenizer, tiny_cfg):
    batch = Collator(tokenizer.pad_token_id)(encoded(tokenizer)[:6])
    model = tiny_llama(tokenizer)
    losses = {}
    for backend in ("generic", "auto"):
        calls = len(npu.fused_ce_rows)
        losses[backend] = SFTModule(model, OPT, loss_backend=backend).loss(batch)
        assert (len(npu.fused_ce_rows) > calls) == (backend == "auto")
    assert torch.allclose(losses["auto"], losses["generic"], rtol=1e-5)
    assert KDModule(model, OPT, loss_backend="npu").loss_backend == "npu"
    with pytest.raises(ValueError, match="loss_backend must be one of"):
        SFTModule(model, OPT, loss_backend="cuda")
    # the stage config key reaches the module arguments
    cfg = tiny_cfg("pipeline.stages.sft_fast.loss_backend=generic")
    specs = [s for s in resolve_stages(cfg, set(STAGE_KINDS)) if s.kind in ("sft", "kd")]
    parts = {s.name: optimizer_parts(s.config)["loss_backend"] for s in specs}
    assert parts["sft_fast"] == "generic" and parts["sft_reasoning"] == parts["kd_fast"] == "auto"
