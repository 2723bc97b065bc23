"""``kdpipe-eval``: evaluate any HF model directory (e.g. a stage's ``export/``) on the task.

kdpipe-eval model_path=logs/runs/<run>/03_sft_fast/export
kdpipe-eval model_path=... split=val style=fast limit=100
kdpipe-eval model_path=... device=npu          # on an Ascend NPU (torch_npu + CANN; docs/ascend.md)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from kdpipe.accelerators import NPUUnavailableError, resolve_device
from kdpipe.accelerators import register as register_accelerators
from kdpipe.data.encode import system_prompt_for
from kdpipe.data.sources import load_examples
from kdpipe.eval import evaluate_model
from kdpipe.models.factory import load_model, load_tokenizer
from kdpipe.utils.io import atomic_write_json
from kdpipe.utils.paths import config_dir
from kdpipe.utils.quiet import quiet_third_party

console = Console()


def format_value(value) -> str:
    if isinstance(value, dict):
        return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()})
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.model_path`` on ``cfg.split`` of ``cfg.data``; write and return the metrics."""
    path = Path(str(cfg.model_path)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model_path {path} is not a directory (expected an HF export)")
    device = resolve_device(str(cfg.device))  # before loading: a missing torch_npu fails fast and says why
    trust = bool(cfg.get("trust_remote_code", False))
    model, tokenizer = load_model(path, trust_remote_code=trust), load_tokenizer(path, trust)
    model.to(device)
    examples = load_examples(cfg.data, str(cfg.split))
    if cfg.get("limit"):
        examples = examples[: int(cfg.limit)]
    metrics, records = evaluate_model(
        model,
        tokenizer,
        examples,
        style=cfg.get("style"),
        system_prompt=system_prompt_for(cfg.data, cfg.get("style")),
        batch_size=int(cfg.batch_size),
        max_new_tokens=int(cfg.max_new_tokens),
    )
    output = Path(str(cfg.output)) if cfg.get("output") else path.parent / f"eval_{cfg.split}.json"
    atomic_write_json(output, {"model_path": str(path), "split": str(cfg.split), "metrics": metrics})
    if cfg.get("save_generations", True):
        with open(output.with_suffix(".jsonl"), "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    table = Table(title=f"kdpipe-eval {path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, format_value(value))
    console.print(table)
    console.print(f"metrics written to {output}")
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> float:
    quiet_third_party()
    register_accelerators()
    try:
        return float(evaluate(cfg)["accuracy"])
    except (FileNotFoundError, NPUUnavailableError) as err:
        print(f"kdpipe-eval: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
