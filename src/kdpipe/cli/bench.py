"""``kdpipe-bench``: benchmarks that print a table and optionally write JSON.

kdpipe-bench store --json bench/store.json          # teacher-store size, error and speed
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
    keys = list(rows[0])
    for key in keys:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*[f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys])
    Console(width=max(Console().width, 230)).print(table)


def bench_store(args: argparse.Namespace) -> dict:
    from kdpipe.benchmarks.store import run

    rows = [run(vocab=v, k=k, positions=args.positions) for v, k in ((49152, 64), (49152, 128), (153376, 64))]
    print_table("teacher store (synthetic LM-shaped teacher)", rows)
    return {"store": rows}


def bench_loss(args: argparse.Namespace) -> dict:
    import torch

    from kdpipe.benchmarks.loss import SHAPES, run
    from kdpipe.losses.settings import DIVERGENCES, TAIL_MODES

    shapes = known_names(args.shapes, SHAPES, "--shapes")
    divergences = known_names(args.divergences, DIVERGENCES, "--divergences")
    tails = known_names(args.tails, TAIL_MODES, "--tails")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows, summary = run(shapes, device, args.repeats, args.warmup, args.chunk_size, divergences, tails)
    shown = ("shape", "divergence", "tail", "floor_s", "plain_s", "fused_s", "fused_peak_gib", "plain_peak_gib")
    print_table(
        f"LM-head loss, forward + backward ({device}; divergence + CE 0.5, k from the shape)",
        [{**{k: r[k] for k in shown}, **{k: v for k, v in r.items() if "ratio" in k}} for r in summary],
    )
    return {"loss": summary, "cases": rows}


def bench_step(args: argparse.Namespace) -> dict:
    from kdpipe.benchmarks.step import MODELS, run

    models = known_names(args.models, MODELS, "--models")
    rows = [run(model, steps=args.steps, warmup=args.warmup) for model in models]
    print_table("training step, SFT vs KD (CPU, bf16 autocast, fused loss, store read in the step)", rows)
    return {"step": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdpipe-bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    store = sub.add_parser("store", help="teacher-store bytes per entry, KL error, write/read speed")
    store.add_argument("--positions", type=int, default=16384, help="label positions to store")
    store.add_argument("--json", type=Path, help="also write the figures here")
    loss = sub.add_parser("loss", help="fused vs plain vs LM-head floor: time and peak memory, per shape")
    loss.add_argument("--shapes", default="smollm2-135m,openpangu-1b", help="comma-separated shape names")
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
    step.add_argument("--models", default="demo-student,demo-teacher,smollm2-135m-shape")
    step.add_argument("--steps", type=int, default=10, help="timed steps of each kind (median reported)")
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with exit_on_user_error("kdpipe-bench"):  # an unknown name, a --json path that cannot be written: one line
        result = {"store": bench_store, "loss": bench_loss, "step": bench_step}[args.bench](args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"written {args.json}")


if __name__ == "__main__":
    main()
