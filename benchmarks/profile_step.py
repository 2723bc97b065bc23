"""Where a kdpipe training step on SmolLM2-135M spends its time: phases, and the top ops of one step.

Run with kdpipe's venv (``make bench-trl`` does not run it; it is for reading the bounds)::

    .venv/bin/python benchmarks/profile_step.py --packing on --kd           # one KD step, packed
    .venv/bin/python benchmarks/profile_step.py --packing off --optimizer adamw-fused

Same model, data and step as ``kdpipe-bench step --models smollm2-135m`` (kdpipe.benchmarks.step_real): the
generated arithmetic chat examples, batch 8, max length 128, fp32 unless ``--precision bf16-mixed``. After
``--warmup`` untimed steps it times ``--steps`` steps phase by phase (collate incl. the teacher-store join,
forward + fused loss, backward, grad-norm clip, optimizer step + zero grad; medians), then runs one more step
under ``torch.profiler`` and prints the top ops by self CPU time, and the self CPU time grouped into
matmuls (linear layers and the LM head), attention, optimizer and the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.benchmarks.step import build_store
from kdpipe.benchmarks.step_real import OPTIMIZERS, chat_arith_records, encode_records, load_real_model, score_store
from kdpipe.data.collate import Collator, KDCollator
from kdpipe.losses import KDLossSettings
from kdpipe.modules import KDModule, SFTModule

GROUPS = {  # op name -> group for the summary (self CPU time)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::addmm_"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "optimizer": ("Optimizer.", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_", "aten::_fused_adam"),
}


def group_of(name: str, shapes, vocab: int) -> str:
    if any(key in name for key in GROUPS["matmul"]) and any(vocab in shape for shape in shapes or [] if shape):
        return "lm_head_matmul"  # the [tokens x vocab] products of the loss (and the embedding's)
    for group, keys in GROUPS.items():
        if any(key in name for key in keys):
            return group
    return "other"


def phases(module, optimizer, batch, kd: bool, precision: str, clip: float | None) -> dict[str, float]:
    """One step, timed phase by phase."""
    out = {}
    t = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with autocast:
        loss = module.fused_terms(batch, KDLossSettings(**module.loss_options)).loss if kd else module.loss(batch)
    out["forward_loss"], t = time.perf_counter() - t, time.perf_counter()
    loss.backward()
    out["backward"], t = time.perf_counter() - t, time.perf_counter()
    if clip:
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), clip)
    out["clip"], t = time.perf_counter() - t, time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out["optimizer"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packing", choices=("on", "off"), default="on")
    parser.add_argument("--kd", action="store_true", help="a KD step (store joined in the collate) instead of SFT")
    parser.add_argument("--teacher", choices=("model", "synthetic"), default="synthetic", help="KD store signal")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adamw")
    parser.add_argument("--attn", default=None, help="attn_implementation override (sdpa, eager)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="phase-timed steps (medians)")
    parser.add_argument("--rows", type=int, default=20, help="top ops shown")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)

    tokenizer, net, _ = load_real_model("smollm2-135m")
    if args.attn:
        net.set_attn_implementation(args.attn)
    pad = tokenizer.pad_token_id
    n = args.batch_size * (args.warmup + args.steps + 1)
    examples = encode_records(tokenizer, chat_arith_records(n), args.max_length)
    batches = [examples[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    base = Collator(pad, packing=args.packing == "on")
    root = Path(tempfile.mkdtemp(prefix="kdpipe-profile-"))
    try:
        collate = base
        opt = functools.partial(torch.optim.AdamW, lr=2e-5, weight_decay=0.0)
        module = SFTModule(net, opt)
        if args.kd:
            vocab = int(net.get_input_embeddings().num_embeddings)
            if args.teacher == "model":
                store = score_store(root / "store", net, examples, pad, 64, args.batch_size)
            else:
                store = build_store(root / "store", examples, vocab, 64)
            store.verify_all()
            collate = KDCollator(base, store)
            module = KDModule(net, opt, loss={"divergence": "fkl", "ce_weight": 0.5})
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-5, weight_decay=0.0, **OPTIMIZERS[args.optimizer])
        timed: list[dict[str, float]] = []
        for i, chunk in enumerate(batches[:-1]):
            t = time.perf_counter()
            batch = collate(chunk)
            collate_s = time.perf_counter() - t
            step = {"collate": collate_s, **phases(module, optimizer, batch, args.kd, args.precision, 1.0)}
            if i >= args.warmup:
                timed.append(step)
        tokens = sum(len(e.input_ids) for b in batches[args.warmup : -1] for e in b) / max(len(timed), 1)
        median = {k: statistics.median(s[k] for s in timed) for k in timed[0]}
        total = sum(median.values())
        kind = "KD" if args.kd else "SFT"
        print(
            f"\n{kind} step, packing {args.packing}, {args.precision}, {args.optimizer}, threads "
            f"{torch.get_num_threads()}: {total:.3f} s per step (medians of {len(timed)}), "
            f"{tokens:.0f} non-pad tokens per step -> {tokens / total:.1f} tokens/s"
        )
        for key, value in median.items():
            print(f"  {key:13s} {value:7.3f} s  {100 * value / total:5.1f}%")
        if args.no_profile:
            return
        batch = collate(batches[-1])
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            phases(module, optimizer, batch, args.kd, args.precision, 1.0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        vocab = int(net.get_input_embeddings().num_embeddings)
        groups: dict[str, float] = {}
        for event in prof.key_averages(group_by_input_shape=True):
            group = group_of(event.key, event.input_shapes, vocab)
            groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6
        whole = sum(groups.values())
        print(
            "self CPU time by group: " + ", ".join(f"{g} {s:.2f} s ({100 * s / whole:.0f}%)" for g, s in groups.items())
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
