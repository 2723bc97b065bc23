"""Pipelines with a LoRA student: every stage exports a plain (merged) checkpoint, and a stage resumes exactly from
its slim (adapters-only) checkpoint. (LoRA itself, in process: tests/unit/models/test_models.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdpipe.cli.train import train
from tests.helpers import assert_same_weights, crash_override

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (kdpipe[real])")


@needs_peft
def test_a_lora_student_pipeline_exports_plain_checkpoints_every_stage(tiny_cfg, tmp_path):
    """Teacher fully trained, student through LoRA: every stage's export loads with plain transformers."""
    cfg = tiny_cfg(
        "pipeline.order=[teacher_sft,score,sft_fast,kd_fast]",
        "models.student.lora.enabled=true",
        "models.student.lora.r=4",
        "models.student.attn_implementation=eager",
    )
    run = train(cfg)
    stages = {s["name"]: s for s in run.results["stages"]}
    teacher, sft, kd = (stages[n]["metrics"] for n in ("teacher_sft", "sft_fast", "kd_fast"))
    assert teacher["trainable_parameters"] == teacher["parameters"]
    for metrics in (sft, kd):
        assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 2
        assert metrics["steps_per_s"] > 0 and metrics["peak_rss_mb"] > 0
        assert "accuracy" in metrics  # evaluated on the merged model
    for name in ("teacher_sft", "sft_fast", "kd_fast"):
        export = tmp_path / "run" / stages[name]["dir"] / "export"
        model = AutoModelForCausalLM.from_pretrained(export)
        tok = AutoTokenizer.from_pretrained(export)
        assert not any("lora" in n for n, _ in model.named_parameters())
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "1+1"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > prompt["input_ids"].shape[1]


@needs_peft
def test_a_lora_stage_resumes_exactly_from_its_slim_checkpoint(tiny_cfg, tmp_path):
    overrides = [
        "pipeline.order=[sft_fast]",
        "models.student.lora.enabled=true",
        "models.student.lora.dropout=0.0",  # resume restores weights, optimizer and data order, not dropout's RNG
        "pipeline.stages.sft_fast.eval.enabled=false",
    ]
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    train(tiny_cfg(*overrides, run_dir=reference_dir))
    crash = crash_override("01_sft_fast", 4, tmp_path / "crashed.marker")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*overrides, crash, run_dir=crashed_dir))
    checkpoint = torch.load(crashed_dir / "01_sft_fast" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and all("lora_" in key for key in checkpoint["state_dict"])
    train(tiny_cfg(f"resume={crashed_dir}"))
    assert_same_weights(reference_dir / "01_sft_fast" / "export", crashed_dir / "01_sft_fast" / "export")
