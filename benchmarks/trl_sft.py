"""TRL's ``SFTTrainer`` on the chat examples ``kdpipe-bench step`` trained on: trained tokens per second.

Standalone: needs only torch, transformers, datasets and trl (``make venv-trl`` builds ``.venv-trl`` with
them), never kdpipe. ``make bench-trl`` runs kdpipe's side first, then this script, and prints both::

    .venv/bin/kdpipe-bench step --models smollm2-135m --data-out logs/bench/trl/chat_arith.jsonl \\
        --json logs/bench/trl/kdpipe.json
    .venv-trl/bin/python benchmarks/trl_sft.py --kdpipe-json logs/bench/trl/kdpipe.json \\
        --json logs/bench/trl/trl.json

``--kdpipe-json`` supplies the checkpoint directory, the data file, the batch size, the max length and the
numbers of steps kdpipe used (each can be given instead with ``--model-dir``, ``--data`` ...), and adds the
comparison table (kdpipe's rate over TRL's).

TRL runs at its defaults except for what the comparison fixes: ``per_device_train_batch_size`` (8),
``max_length`` (128), fp32 (``bf16=False``; TRL's default would be bf16 autocast), ``max_steps`` (warm-up +
timed), no evaluation, no saving, ``report_to="none"``, and ``train_sampling_strategy="sequential"`` so
that step ``i`` trains on the same 8 examples as kdpipe's step ``i``. Left at TRL's defaults: padding to the
longest example of the batch, no packing, not padding-free, the chat template applied to ``messages`` and the
loss on every non-pad token (TRL's default for a ``messages`` dataset), TRL's fused LM-head log-probs with its
entropy and token-accuracy metrics, ``gradient_checkpointing=True``, fused AdamW (``adamw_torch_fused``, lr
2e-5, linear decay), grad-norm clipping at 1.0, logging every 10 steps. ``--variants default,no-gc`` adds a
run with ``gradient_checkpointing=False`` (kdpipe does not recompute activations).

What is timed and counted, per optimizer step (gradient accumulation 1):

- ``step``: a ``TrainerCallback`` from ``on_step_begin`` to ``on_step_end``: forward, loss, backward, grad
  clipping, optimizer and scheduler step, zero grad. The batch was collated before ``on_step_begin`` (by the
  dataloader, outside the window; kdpipe's window includes its collation, a few ms);
- ``loop``: from one ``on_step_end`` to the next: the above plus fetching/collating the batch and the
  trainer's per-step bookkeeping (logging, progress bar);
- ``tokens``: non-pad tokens of the batch, ``attention_mask.sum()`` of the collated batch (recorded by a thin
  wrapper around TRL's own collator; checked against TRL's own ``num_tokens`` counter);
- ``label_tokens``: loss-bearing positions, ``(labels[:, 1:] != -100).sum()`` (TRL shifts inside the model):
  every non-pad token but the first of each row;
- ``assistant_tokens``: the batch's label positions as kdpipe counts them (assistant tokens only, from the
  data file): what kdpipe's SFT trains on, for a like-for-like "trained tokens" rate.

Rates are the tokens of the timed steps over their summed seconds. Before training, the script checks that
TRL's tokenization of every example equals the ``input_ids`` kdpipe wrote (``tokens_match``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

VARIANTS = {"default": {}, "no-gc": {"gradient_checkpointing": False}}


class RecordingCollator:
    """TRL's collator, unchanged, recording what each batch it builds holds (in dataloader order)."""

    def __init__(self, inner) -> None:
        self.inner, self.batches = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        mask, labels = batch["attention_mask"], batch["labels"]
        self.batches.append(
            {
                "rows": int(mask.shape[0]),
                "tokens": int(mask.sum()),
                "padded_tokens": int(mask.numel()),
                "label_tokens": int((labels[:, 1:] != -100).sum()),
            }
        )
        return batch


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (``on_step_begin`` to ``on_step_end``) and between step ends; TRL's
    own non-pad token counter around each step; optionally a torch.profiler trace of one step."""

    def __init__(self, trainer, profile_step: int | None = None) -> None:
        self.trainer, self.profile_step = trainer, profile_step
        self.steps: list[dict] = []
        self._began = self._last_end = None
        self._counted = 0
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_step is not None and state.global_step + 1 == self.profile_step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
        self._counted = self.trainer._total_train_tokens
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        ended = time.perf_counter()
        if self.profiler is not None and state.global_step == self.profile_step:
            self.profiler.__exit__(None, None, None)
        self.steps.append(
            {
                "step": state.global_step,
                "step_s": ended - self._began,
                "loop_s": ended - self._last_end if self._last_end is not None else None,
                "trl_num_tokens": self.trainer._total_train_tokens - self._counted,
            }
        )
        self._last_end = ended


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_variant(name: str, model_dir: str, records: list[dict], opts: argparse.Namespace) -> dict:
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in records])
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=opts.batch_size,
            max_length=opts.max_length,
            bf16=False,
            fp16=False,
            max_steps=opts.warmup + opts.steps,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            train_sampling_strategy="sequential",
            seed=0,
            **VARIANTS[name],
        )
        trainer = SFTTrainer(model=model_dir, args=config, train_dataset=dataset)
        theirs = trainer.train_dataset["input_ids"]
        mismatched = [r["id"] for r, ids in zip(records, theirs) if "input_ids" in r and list(ids) != r["input_ids"]]
        recorder = RecordingCollator(trainer.data_collator)
        trainer.data_collator = recorder
        profile_step = opts.warmup + 1 if opts.profile else None
        timer = StepTimer(trainer, profile_step)
        trainer.add_callback(timer)
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
    steps = timer.steps
    for entry, batch in zip(steps, recorder.batches):  # the dataloader builds batches in step order
        entry.update(batch)
    for i, entry in enumerate(steps):  # kdpipe's count for the same examples
        chunk = records[i * opts.batch_size : (i + 1) * opts.batch_size]
        entry["assistant_tokens"] = sum(r.get("num_label_tokens", 0) for r in chunk)
    timed = [s for s in steps if s["step"] > opts.warmup]
    step_s = sum(s["step_s"] for s in timed)
    loop_s = sum(s["loop_s"] for s in timed if s["loop_s"] is not None)
    tokens = sum(s["tokens"] for s in timed)
    result = {
        "variant": name,
        "gradient_checkpointing": config.gradient_checkpointing,
        "optim": str(getattr(config.optim, "value", config.optim)),
        "precision": "32-true",
        "packing": False,
        "steps": len(timed),
        "tokens": tokens,
        "label_tokens": sum(s["label_tokens"] for s in timed),
        "assistant_tokens": sum(s["assistant_tokens"] for s in timed),
        "padded_tokens": sum(s["padded_tokens"] for s in timed),
        "median_step_s": sorted(s["step_s"] for s in timed)[len(timed) // 2] if timed else None,
        "tokens_per_s": tokens / step_s if step_s else 0.0,
        "label_tokens_per_s": sum(s["label_tokens"] for s in timed) / step_s if step_s else 0.0,
        "assistant_tokens_per_s": sum(s["assistant_tokens"] for s in timed) / step_s if step_s else 0.0,
        "loop_tokens_per_s": tokens / loop_s if loop_s else 0.0,
        "train_s": train_s,
        "tokens_match": not mismatched,
        "tokens_mismatched": mismatched[:10],
        "trl_counter_matches": all(s["trl_num_tokens"] == s["tokens"] for s in steps),
        "per_step": steps,
    }
    if timer.profiler is not None:
        table = timer.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=opts.profile_rows)
        result["profile"] = table
        print(f"\nprofile of TRL step {profile_step} ({name}), top ops by self CPU time:\n{table}")
    return result


def versions() -> dict:
    import accelerate
    import datasets
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def comparison(kdpipe_rows: list[dict], trl_rows: list[dict]) -> list[dict]:
    """kdpipe's rows beside TRL's: non-pad tokens/s and the ratios over TRL's default run (else its first)."""
    base = next((r for r in trl_rows if r["variant"] == "default"), trl_rows[0])
    out = []
    for r in trl_rows:
        out.append(
            {
                "trainer": f"TRL SFTTrainer ({r['variant']})",
                "precision": r["precision"],
                "optimizer": r["optim"],
                "packing": r["packing"],
                "sft_tokens_per_s": r["tokens_per_s"],
                "kd_tokens_per_s": None,
                "sft_vs_trl": r["tokens_per_s"] / base["tokens_per_s"],
                "kd_vs_trl": None,
                "kd_over_sft_time": None,
            }
        )
    for r in kdpipe_rows:
        out.append(
            {
                "trainer": "kdpipe",
                "precision": r["precision"],
                "optimizer": r.get("optimizer", "adamw"),
                "packing": r["packing"],
                "sft_tokens_per_s": r["sft_tokens_per_s"],
                "kd_tokens_per_s": r["kd_tokens_per_s"],
                "sft_vs_trl": r["sft_tokens_per_s"] / base["tokens_per_s"],
                "kd_vs_trl": r["kd_tokens_per_s"] / base["tokens_per_s"],
                "kd_over_sft_time": r["kd_over_sft_time"],
            }
        )
    return out


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    cell = lambda v: "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kdpipe-json", type=Path, help="kdpipe-bench step's JSON: setup defaults + comparison")
    parser.add_argument("--model-dir", help="the HF checkpoint directory (default: kdpipe's, from --kdpipe-json)")
    parser.add_argument("--data", type=Path, help="the chat JSONL kdpipe wrote (default: from --kdpipe-json)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--steps", type=int, help="timed steps")
    parser.add_argument("--warmup", type=int, help="untimed steps first")
    parser.add_argument("--variants", default="default", help="comma-separated: default, no-gc")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of the first timed step")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    opts = parser.parse_args(argv)
    kdpipe = json.loads(opts.kdpipe_json.read_text()) if opts.kdpipe_json else {}
    setup = (kdpipe.get("step_setup") or [{}])[0]
    defaults = {"model_dir": "model_dir", "data": "data_file", "batch_size": "batch_size"}
    defaults |= {"max_length": "max_length", "steps": "steps", "warmup": "warmup"}
    for opt, key in defaults.items():
        if getattr(opts, opt) is None:
            if key not in setup or setup[key] is None:
                parser.error(f"--{opt.replace('_', '-')} is needed (or --kdpipe-json of a run that has it)")
            setattr(opts, opt, Path(setup[key]) if opt == "data" else setup[key])
    unknown = [v for v in opts.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    records = read_records(opts.data)
    needed = opts.batch_size * (opts.warmup + opts.steps)
    if len(records) < needed:
        parser.error(f"{opts.data} has {len(records)} examples, {needed} needed")
    records = records[:needed]
    rows = [run_variant(v, str(opts.model_dir), records, opts) for v in opts.variants.split(",")]
    shown = ("variant", "gradient_checkpointing", "steps", "tokens", "label_tokens", "assistant_tokens")
    shown += ("padded_tokens", "median_step_s", "tokens_per_s", "label_tokens_per_s", "assistant_tokens_per_s")
    shown += ("loop_tokens_per_s", "tokens_match", "trl_counter_matches")
    print(f"\nTRL SFTTrainer, {opts.model_dir}: batch {opts.batch_size}, max {opts.max_length} tokens, fp32, ")
    print(f"{opts.steps} timed steps after {opts.warmup} (tokens = non-pad, label = loss-bearing)\n")
    print(markdown([{k: r[k] for k in shown} for r in rows]))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "model_dir": str(opts.model_dir),
        "data": str(opts.data),
        "batch_size": opts.batch_size,
        "max_length": opts.max_length,
        "trl": rows,
    }
    kd_rows = [r for r in kdpipe.get("step", []) if "precision" in r]
    if kd_rows:
        table = comparison(kd_rows, rows)
        print(f"\n{result['date']}, {result['cpu']}, {result['threads']} threads, {result['versions']}")
        print(f"command: {result['command']}")
        print("\nkdpipe vs TRL (non-pad tokens per second inside the training steps; vs_trl: over TRL's default)\n")
        print(markdown(table))
        result["kdpipe"] = {"setup": setup, "rows": kd_rows}
        result["comparison"] = table
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten {opts.json}")


if __name__ == "__main__":
    main()
