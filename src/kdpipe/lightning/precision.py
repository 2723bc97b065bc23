"""``trainer.precision: auto``: the fastest precision for this stage's model on this machine, chosen by device
or, on a CPU, measured.

On a GPU, bf16 autocast is the fast path where the GPU supports bf16 (else fp16 with loss scaling). On a CPU it
depends on the CPU and the model: with ``avx512_bf16``/AMX and matrices large enough, bf16 autocast wins; a CPU
without them emulates bf16, and a small model loses more in casts than it gains. So on a CPU the stage times a
few forward and backward passes of its own model in fp32 and under bf16 autocast, on a batch of its own shape,
and keeps bf16 only where it is clearly faster (fp32 is exact). The probe leaves the weights, the gradients and
the RNG state as it found them; its timings are recorded in the stage's metrics.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from omegaconf import DictConfig

from kdpipe.utils.dist import broadcast_object

AUTO = "auto"
CPU_CANDIDATES = ("32-true", "bf16-mixed")
BF16_MARGIN = 1.1  # bf16 must be this much faster to be chosen over exact fp32


def _step(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> float:
    """Seconds of one forward + backward."""
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        out = model(input_ids=ids)
    out.logits.float().mean().backward()
    return time.perf_counter() - started


def probe_cpu_precision(model: torch.nn.Module, batch_size: int, seq_len: int, rounds: int = 4) -> dict[str, float]:
    """Seconds per forward + backward of ``model`` in each CPU candidate precision: the fastest of ``rounds``
    passes each, the candidates interleaved so that a busy machine slows both alike (weights, grads, RNG kept)."""
    rng = torch.get_rng_state()
    was_training = model.training
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    try:
        model.train()
        for precision in CPU_CANDIDATES:  # warm-up: first-call allocations and kernel selection
            _step(model, ids, precision == "bf16-mixed")
        times: dict[str, list[float]] = {p: [] for p in CPU_CANDIDATES}
        for _ in range(rounds):
            for precision in CPU_CANDIDATES:
                times[precision].append(_step(model, ids, precision == "bf16-mixed"))
        return {p: min(t) for p, t in times.items()}
    finally:
        for name, param in model.named_parameters():
            param.grad = grads[name]
        model.train(was_training)
        torch.set_rng_state(rng)


def resolve_precision(
    trainer_cfg: DictConfig, model: torch.nn.Module, batch_size: int, seq_len: int
) -> tuple[str | None, dict]:
    """The precision a stage trains in, and what the choice was based on (for its metrics).

    A configured precision other than ``auto`` is kept as it is. ``auto``: on CUDA, ``bf16-mixed`` where
    supported, else ``16-mixed``; on a CPU, the measured choice (rank 0 measures, every rank uses its result)."""
    configured = trainer_cfg.get("precision")
    if str(configured) != AUTO:
        return configured, {}
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"), {"precision_chosen_by": "device"}
    if accelerator not in ("cpu", "auto"):  # e.g. an NPU config without its plugin: its own default
        return None, {}
    timings = broadcast_object(probe_cpu_precision(model, batch_size, seq_len))
    fp32, bf16 = timings["32-true"], timings["bf16-mixed"]
    chosen = "bf16-mixed" if fp32 > BF16_MARGIN * bf16 else "32-true"
    info = {"precision_chosen_by": "probe", "probe_s_per_step_fp32": fp32, "probe_s_per_step_bf16": bf16}
    return chosen, info
