"""Training-step benchmark: tokens per second of an SFT step and a KD step on the same model and batches.

A step here is what a training stage does per batch: collate (for KD, joining the teacher store's rows read
from disk), forward through the backbone, the fused loss, backward, optimizer step; under bf16 autocast like
the default trainer. ``kd_over_sft_time`` is the KD step time over the SFT step time. Shard checksums are
verified once per run on first read; that one-time cost is reported apart (``store_verify_s``).

Two kinds of model:

- the shapes of :data:`MODELS`: randomly initialised llama models on random token sequences (:func:`run`);
- the real checkpoints of ``step_real.REAL_MODELS`` (``kdpipe.benchmarks.step_real.run_real``), e.g.
  SmolLM2-135M-Instruct loaded through kdpipe's model factory, on generated arithmetic chat examples
  (``step_real.chat_arith_records``) rendered with the
  tokenizer's chat template and encoded as a training stage encodes them (:func:`kdpipe.data.encode.encode_example`).
  One row per packing mode and precision; the teacher store holds the same model's real top-k (``teacher="model"``)
  or the synthetic signal (``teacher="synthetic"``). The chat examples can be written to a JSONL file (with their
  token ids) so that another trainer (``benchmarks/trl_sft.py``: TRL's ``SFTTrainer``) trains on the very same
  examples, in the same order, in batches of the same size.

What the real-model rows count, per timed step: ``tokens`` are the batch's non-pad tokens (every token of every
example: what a training stage's ``tokens_per_s`` counts), ``label_tokens`` its loss-bearing positions (the
assistant tokens, prompt tokens carry no labels). Rates are the tokens of all timed steps over their summed time.
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


def one_step(module, optimizer, batch, kd: bool, precision: str = "32-true") -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = module.fused_terms(batch, KDLossSettings(**module.loss_options)).loss if kd else module.loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_interleaved(sft, kd, collate_sft, collate_kd, examples, batch_size, steps, warmup, precision="32-true"):
    """Alternate an SFT step and a KD step on the same batch, so machine drift hits both alike."""
    optimizers = {name: torch.optim.AdamW(m.model.parameters(), lr=1e-4) for name, m in (("sft", sft), ("kd", kd))}
    times: dict[str, list[float]] = {"sft": [], "kd": [], "collate_sft": [], "collate_kd": []}
    tokens = 0
    for step in range(warmup + steps):
        chunk = examples[(step * batch_size) % len(examples) :][:batch_size]
        for name, module, collate in (("sft", sft, collate_sft), ("kd", kd, collate_kd)):
            started = time.perf_counter()
            batch = collate(chunk)
            collated = time.perf_counter()
            one_step(module, optimizers[name], batch, kd=name == "kd", precision=precision)
            if step >= warmup:
                times[name].append(time.perf_counter() - started)
                times[f"collate_{name}"].append(collated - started)
                tokens = int(batch["attention_mask"].sum())
    medians = {name: statistics.median(values) for name, values in times.items()}
    # the store's share: reading and decoding the teacher rows, what the KD collate does beyond the SFT one
    join = max(medians["collate_kd"] - medians["collate_sft"], 0.0)
    return medians["sft"], medians["kd"], tokens, join


def run(model: str, steps: int = 10, warmup: int = 2, k: int = 64, precision: str = "32-true") -> dict:
    """SFT and KD steps of a synthetic-weight model of one of :data:`MODELS`' shapes; ``precision`` 32-true or
    bf16-mixed (bf16 autocast: slower than fp32 on a CPU without bf16 instructions, e.g. this project's)."""
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
        sft_s, kd_s, tokens, join_s = time_interleaved(
            sft, kd, Collator(0), KDCollator(Collator(0), store), examples, batch_size, steps, warmup, precision
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "model": model,
        "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "batch": f"{batch_size}x{seq_len}",
        "k": min(k, vocab),
        "precision": precision,
        "sft_step_s": sft_s,
        "kd_step_s": kd_s,
        "sft_tokens_per_s": tokens / sft_s,
        "kd_tokens_per_s": tokens / kd_s,
        "kd_over_sft_time": kd_s / sft_s,
        "store_join_s": join_s,
        "store_join_share_of_kd_step": join_s / kd_s,
        "store_verify_s": verify_s,
    }


# --- real checkpoints on generated chat data -------------------------------------------------------------------
