"""``trainer.precision: auto`` in the pipeline: a training stage probes its own module on a batch of its own
data once, records the choice in ``<stage>/precision.json`` and reuses it when resumed; a shared stage's identity
holds the precision, so a stage shared across runs is not reused across precisions."""

from __future__ import annotations

import json

import pytest
import torch

from kdpipe.lightning import precision as P
from kdpipe.modules import SFTModule
from kdpipe.pipeline.sharing import shared_dir, shared_identity
from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS, StageContext
from kdpipe.pipeline.stages.fit import make_datamodule, optimizer_parts, stage_precision
from tests.helpers import tiny_lm


def teacher_context(tiny_cfg, tmp_path, *extra: str) -> StageContext:
    cfg = tiny_cfg("pipeline.stages.teacher_sft.share=true", *extra)
    spec = resolve_stages(cfg, set(STAGE_KINDS))[0]
    run_dir = tmp_path / "run"
    return StageContext(cfg, spec, run_dir, run_dir / spec.dirname, None)


@pytest.fixture
def cpu(monkeypatch):
    """This machine as a CPU-only one; ``cpu(bf16=True)`` gives it a bf16 fast path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_bf16(bf16: bool) -> None:
        monkeypatch.setattr(P, "cpu_bf16_supported", lambda: bf16)

    set_bf16(False)
    return set_bf16


def test_a_shared_stages_identity_differs_by_precision(tiny_cfg, tmp_path, cpu, monkeypatch):
    def key(*extra: str):
        return shared_dir(teacher_context(tiny_cfg, tmp_path, *extra))

    fp32, bf16, auto = (key(f"trainer.precision={p}") for p in ("32-true", "bf16-mixed", "auto"))
    assert fp32 != bf16
    assert auto == fp32  # auto on a CPU without a bf16 fast path trains in fp32: the same result as 32-true
    cpu(True)  # a CPU where the probe decides: neither fixed precision's folder
    measured = teacher_context(tiny_cfg, tmp_path, "trainer.precision=auto")
    assert shared_identity(measured)["trainer"]["precision"] == P.MEASURED
    assert shared_dir(measured) not in (fp32, bf16)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, precision in ((True, "bf16-mixed"), (False, "16-mixed")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        on_gpu = key("trainer.accelerator=gpu", "trainer.precision=auto")
        assert on_gpu == key("trainer.accelerator=gpu", f"trainer.precision={precision}")


def test_a_stage_probes_its_own_module_once_and_a_resumed_stage_reuses_the_choice(
    tiny_cfg, tmp_path, tokenizer, cpu, monkeypatch
):
    cpu(True)
    ctx = teacher_context(tiny_cfg, tmp_path, "trainer.precision=auto")
    ctx.stage_dir.mkdir(parents=True)
    model = tiny_lm(tokenizer)
    module = SFTModule(model, **optimizer_parts(ctx.settings))
    datamodule = make_datamodule(ctx, tokenizer, model=model)
    train = datamodule.encode_split("train")
    shapes = []
    probe = P.probe_cpu_precision
    monkeypatch.setattr(P, "probe_cpu_precision", lambda m, batch, *a, **k: shapes.append(batch) or probe(m, batch))

    precision, info = stage_precision(ctx, module, datamodule, train)
    assert precision in P.CPU_CANDIDATES and precision == P.choose(
        {"32-true": info["probe_s_per_step_fp32"], "bf16-mixed": info["probe_s_per_step_bf16"]}
    )
    (batch,) = shapes  # the stage's collated batch: its batch size, its label masks
    assert batch["input_ids"].shape[0] == int(ctx.settings.batch_size) and (batch["labels"] == -100).any()
    saved = json.loads((ctx.stage_dir / P.PRECISION_FILE).read_text())
    assert saved == {"precision": precision, "info": info}

    monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, **k: pytest.fail("probed again on resume"))
    assert stage_precision(ctx, module, datamodule, train) == (precision, {**info, "precision_reused": True})
