"""Check a run's exports outside kdpipe: reload one with plain ``transformers`` and generate, and print what each
training stage measured (steps/s, peak memory, trained parameters).

    python -m kdpipe.models.check_export logs/real_demo/<run>            # the run's last export
    python -m kdpipe.models.check_export <run> --prompt "What is 17 + 25?" --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdpipe.utils.memory import peak_memory_mb

console = Console()
# metric -> column header
FIGURES = {
    "steps": "steps",
    "train_seconds": "stage s",
    "steps_per_s": "steps/s",
    "tokens_per_s": "tokens/s",
    "peak_rss_mb": "peak RSS MiB",
    "peak_cuda_mb": "peak CUDA MiB",
    "trainable_parameters": "trained params",
}


def last_export(run_dir: Path) -> Path:
    """The export of the run's last stage that wrote one (from ``pipeline_state.json``)."""
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    exports = [s["export"] for s in state["stages"] if s.get("export")]
    if not exports:
        raise FileNotFoundError(f"{run_dir}: no stage has written an export yet")
    path = Path(exports[-1])
    return path if path.is_absolute() else run_dir / path


@torch.no_grad()
def generate_from_export(export: str | Path, prompt: str, max_new_tokens: int = 48) -> tuple[str, float]:
    """Load ``export`` with ``AutoModelForCausalLM`` / ``AutoTokenizer`` only, answer ``prompt`` greedily through
    the chat template; returns the response and the seconds it took (load included)."""
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text, time.perf_counter() - started


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{value:,}"


def stage_figures(run_dir: Path) -> Table:
    """One row per training stage of ``results.json`` with its throughput and peak memory."""
    payload = json.loads((run_dir / "results.json").read_text())
    table = Table(title=f"training stages of {run_dir}")
    for column in ("stage", *FIGURES.values()):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in payload["stages"]:
        metrics = stage["metrics"]
        if "steps_per_s" not in metrics:
            continue
        table.add_row(stage["name"], *(_cell(metrics.get(k)) for k in FIGURES))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (or an export directory with --export)")
    parser.add_argument("--export", action="store_true", help="run_dir is itself an HF export directory")
    parser.add_argument("--prompt", default="What is 17 + 25?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    if args.export:
        export = args.run_dir
    else:
        Console(width=max(console.width, 120)).print(stage_figures(args.run_dir))
        export = last_export(args.run_dir)
    text, seconds = generate_from_export(export, args.prompt, args.max_new_tokens)
    console.print(f"[bold]{export}[/bold] (plain transformers, {seconds:.1f}s): {args.prompt!r} -> {text!r}")
    console.print(", ".join(f"{k} {v:,.0f}" for k, v in peak_memory_mb().items()) + " (this check)")


if __name__ == "__main__":
    main()
