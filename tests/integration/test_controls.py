"""A budget-matched control (``control_of``): an SFT continuation with the controlled stage's data, steps,
seed and starting weights, which no later stage continues from."""

from __future__ import annotations

import pytest
import yaml

from kdpipe.cli.train import train
from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.spec import resolve_stages
from kdpipe.pipeline.stages import STAGE_KINDS

ORDER = "pipeline.order=[teacher_sft,score,sft_fast,kd_fast,kd_fast_control,eval_student]"


def test_a_control_copies_the_kd_stage_and_keeps_its_seed(tiny_cfg):
    cfg = tiny_cfg(ORDER, "pipeline.stages.kd_fast.max_steps=5", "pipeline.stages.kd_fast.optimizer.lr=0.002")
    specs = {s.name: s for s in resolve_stages(cfg, set(STAGE_KINDS))}
    kd, control = specs["kd_fast"].config, specs["kd_fast_control"].config
    assert control.kind == "sft" and control.control_of == "kd_fast" and not control.share
    for key in ("style", "max_steps", "batch_size", "train_fraction", "data_from", "eval"):
        assert control[key] == kd[key], key
    assert control.max_steps == 5 and control.optimizer.lr == 0.002
    assert "store" not in control and "loss" not in control
    from kdpipe.pipeline.stages.context import StageContext

    seeds = [StageContext(cfg, specs[n], None, None, None).seed for n in ("kd_fast", "kd_fast_control")]
    assert seeds[0] == seeds[1]  # same seed, same data order: the pair differs only in the teacher signal


def test_the_control_starts_where_kd_started_and_nothing_continues_from_it(tiny_cfg, one_thread):
    run = train(tiny_cfg(ORDER))
    stages = {s["name"]: s for s in run.results["stages"]}
    assert stages["kd_fast_control"]["status"] == "done"
    sft_export = str(run.result("sft_fast").export)
    meta = {n: yaml.safe_load((run.run_dir / stages[n]["dir"] / "logs" / "csv" / "hparams.yaml").read_text())
            for n in stages}  # fmt: skip
    assert meta["kd_fast"]["starts_from"] == meta["kd_fast_control"]["starts_from"] == sft_export
    assert run.result("kd_fast_control").export != run.result("kd_fast").export
    # the evaluation after the control evaluates the kd stage's weights, not the control's
    assert meta["eval_student"]["starts_from"] == str(run.result("kd_fast").export)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pipeline.order=[teacher_sft,score,sft_fast,kd_fast_control,kd_fast]", "no stage of that name runs before"),
        ("pipeline.stages.kd_fast_control.control_of=score", "must be an sft or kd stage"),
        ("pipeline.stages.kd_fast_control.kind=kd", "a control is an sft stage"),
    ],
)
def test_a_control_of_nothing_or_of_the_wrong_kind_is_refused(tiny_cfg, override, message):
    args = [ORDER, override] if "order" not in override else [override]
    with pytest.raises(PipelineConfigError, match=message):
        resolve_stages(tiny_cfg(*args), set(STAGE_KINDS))
