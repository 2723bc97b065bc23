"""Training-step benchmark: tokens per second of an SFT step and a KD step on the same model and batches.

A step here is what a training stage does per batch: collate (for KD, joining the teacher store's rows read
from disk), forward through the backbone, the fused loss, backward, optimizer step; under bf16 autocast like
the default trainer. ``kd_over_sft_time`` is the KD step time over the SFT step time. Shard checksums are
verified once per run on first read; that one-time cost is reported apart (``store_verify_s``).
"""

from __future__ import annotations

import functools
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdpipe.benchmarks.store import synthetic_teacher
from kdpipe.data.collate import Collator, KDCollator
from kdpipe.losses import KDLossSettings
from kdpipe.modules import KDModule, SFTModule
from kdpipe.store import codec
from kdpipe.store.reader import TeacherStore
from kdpipe.store.writer import StoreWriter
from kdpipe.types import IGNORE_INDEX, EncodedExample

MODELS = {  # name: (llama config kwargs, batch size, sequence length)
    "demo-student": (
        dict(
            hidden_size=96,
            intermediate_size=288,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=104,
        ),
        64,
        48,
    ),
    "demo-teacher": (
        dict(
            hidden_size=192,
            intermediate_size=576,
            num_hidden_layers=4,
            num_attention_heads=3,
            num_key_value_heads=3,
            vocab_size=104,
        ),
        64,
        48,
    ),
    "smollm2-135m-shape": (
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
        ),
        4,
        256,
    ),
}


def synthetic_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[EncodedExample]:
    """Random token sequences whose second half is the (pre-shifted) response."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(vocab) for _ in range(seq_len)]
        labels = [IGNORE_INDEX] * (seq_len // 2) + ids[seq_len // 2 + 1 :] + [IGNORE_INDEX]
        out.append(EncodedExample(id=f"s{i}", input_ids=ids, labels=labels, level=1))
    return out


def build_store(path: Path, examples: list[EncodedExample], vocab: int, k: int) -> TeacherStore:
    rows = sum(e.num_label_tokens for e in examples)
    ids, lps, tail, label = synthetic_teacher(rows, vocab, k)
    writer = StoreWriter(path, examples, {"k": k, "temperature": 1.0}, codec.make_spec(vocab, k), shard_size=64)
    start = 0
    for i, e in enumerate(examples):
        n = e.num_label_tokens
        writer.add(i, ids[start : start + n], lps[start : start + n], tail[start : start + n], label[start : start + n])
        start += n
    writer.finalize()
    return TeacherStore(path)


def one_step(module, optimizer, batch, kd: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.fused_terms(batch, KDLossSettings(**module.loss_options)).loss if kd else module.loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_interleaved(sft, kd, collate_sft, collate_kd, examples, batch_size, steps, warmup):
    """Alternate an SFT step and a KD step on the same batch, so machine drift hits both alike."""
    optimizers = {name: torch.optim.AdamW(m.model.parameters(), lr=1e-4) for name, m in (("sft", sft), ("kd", kd))}
    times: dict[str, list[float]] = {"sft": [], "kd": []}
    tokens = 0
    for step in range(warmup + steps):
        chunk = examples[(step * batch_size) % len(examples) :][:batch_size]
        for name, module, collate in (("sft", sft, collate_sft), ("kd", kd, collate_kd)):
            started = time.perf_counter()
            batch = collate(chunk)
            one_step(module, optimizers[name], batch, kd=name == "kd")
            if step >= warmup:
                times[name].append(time.perf_counter() - started)
                tokens = int(batch["attention_mask"].sum())
    return statistics.median(times["sft"]), statistics.median(times["kd"]), tokens


def run(model: str, steps: int = 10, warmup: int = 2, k: int = 64) -> dict:
    kwargs, batch_size, seq_len = MODELS[model]
    config = AutoConfig.for_model("llama", tie_word_embeddings=True, pad_token_id=0, **kwargs)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config)
    vocab = config.vocab_size
    examples = synthetic_examples(batch_size * (steps + warmup), seq_len, vocab)
    root = Path(tempfile.mkdtemp(prefix="kdpipe-bench-step-"))
    try:
        store = build_store(root, examples, vocab, min(k, vocab))
        started = time.perf_counter()
        store.verify_all()  # one-time per run (each shard's checksum on first read): timed apart from the steps
        verify_s = time.perf_counter() - started
        opt = functools.partial(torch.optim.AdamW, lr=1e-4)
        sft = SFTModule(net, opt)
        kd = KDModule(net, opt, loss={"divergence": "fkl", "ce_weight": 0.5})
        sft_s, kd_s, tokens = time_interleaved(
            sft, kd, Collator(0), KDCollator(Collator(0), store), examples, batch_size, steps, warmup
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "model": model,
        "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "batch": f"{batch_size}x{seq_len}",
        "k": min(k, vocab),
        "sft_step_s": sft_s,
        "kd_step_s": kd_s,
        "sft_tokens_per_s": tokens / sft_s,
        "kd_tokens_per_s": tokens / kd_s,
        "kd_over_sft_time": kd_s / sft_s,
        "store_verify_s": verify_s,
    }
