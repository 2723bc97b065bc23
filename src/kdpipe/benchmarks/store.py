"""Teacher-store benchmark: size, encoding error, write and read speed at a real vocabulary.

The teacher signal is synthetic but LM-shaped (a few boosted tokens over Gaussian logits of varying
sharpness, per position), at SmolLM2's vocabulary (49152) and k = 64 by default. Write time covers encoding
and writing shards through :class:`StoreWriter`; read time covers opening the store (checksums included) and
decoding every example's rows by id, in random order.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.modules.scorer import topk_signal
from kdpipe.store import codec
from kdpipe.store.reader import TeacherStore
from kdpipe.store.writer import StoreWriter
from kdpipe.types import EncodedExample

FLOAT32_BYTES_PER_ENTRY = 8  # int32 id + float32 log-prob: the uncompressed top-k baseline


def synthetic_teacher(positions: int, vocab: int, k: int, seed: int = 0, chunk: int = 512):
    """Top-k signal of LM-like distributions: per position a sharpness in [0.5, 6] and 1-3 boosted tokens."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, positions, chunk):
        n = min(chunk, positions - start)
        sharp = torch.rand(n, 1, generator=g) * 5.5 + 0.5
        logits = torch.randn(n, vocab, generator=g) * sharp
        boosted = torch.randint(0, vocab, (n, 3), generator=g)
        logits.scatter_add_(1, boosted, torch.rand(n, 3, generator=g) * 12)
        labels = torch.randint(0, vocab, (n,), generator=g)
        parts.append(topk_signal(logits, labels, k))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def run(vocab: int = 49152, k: int = 64, positions: int = 16384, tokens_per_example: int = 64, seed: int = 0) -> dict:
    """Measure one store configuration; returns the figures (see :data:`FIELDS`)."""
    ids, lps, tail, label = synthetic_teacher(positions, vocab, k, seed)
    n_examples = positions // tokens_per_example
    positions = n_examples * tokens_per_example
    examples = [
        EncodedExample(id=f"ex{i}", input_ids=[0] * (tokens_per_example + 1), labels=[1] * tokens_per_example + [-100])
        for i in range(n_examples)
    ]
    spec = codec.make_spec(vocab, k)
    root = Path(tempfile.mkdtemp(prefix="kdpipe-bench-store-"))
    try:
        started = time.perf_counter()
        writer = StoreWriter(root, examples, {"k": k, "temperature": 1.0}, spec, shard_size=64)
        for i in range(n_examples):
            rows = slice(i * tokens_per_example, (i + 1) * tokens_per_example)
            writer.add(i, ids[rows], lps[rows], tail[rows], label[rows])
        writer.finalize()
        write_s = time.perf_counter() - started
        nbytes = sum(p.stat().st_size for p in root.glob("shard-*.safetensors"))

        order = list(range(n_examples))
        random.Random(seed).shuffle(order)
        started = time.perf_counter()
        store = TeacherStore(root, verify=True)
        decoded = {i: store.get(f"ex{i}") for i in order}
        read_s = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
    dec_lps = torch.cat([decoded[i].topk_logprobs for i in range(n_examples)])
    dec_tail = torch.cat([decoded[i].tail_logprob for i in range(n_examples)])
    kl = codec.kl_error(lps[:positions], tail[:positions], dec_lps, dec_tail)
    entries = positions * k
    return {
        "vocab_size": vocab,
        "k": k,
        "positions": positions,
        "scheme": spec.scheme,
        "bytes_per_entry": nbytes / entries,
        "bytes_per_token": nbytes / positions,
        "compression_vs_float32": FLOAT32_BYTES_PER_ENTRY / (nbytes / entries),
        "kl_error_nats": float(kl.mean()),
        "kl_error_max_nats": float(kl.max()),
        "write_tokens_per_s": positions / write_s,
        "read_tokens_per_s": positions / read_s,
    }
