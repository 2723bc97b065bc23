"""The optimizer the configs build: ``torch.optim.AdamW`` with its implementation chosen by device.

torch runs AdamW as a Python loop over the parameter tensors unless asked for its ``foreach`` or ``fused``
kernels, and on a CPU it picks the loop. The fused kernel does the whole update in one pass per tensor group:
on SmolLM2-135M on this project's 2-core CPU it cut the optimizer step from 0.65 s to 0.10 s of a 5.6 s
training step (``benchmarks/profile_step.py``, docs/performance.md#against-trl). ``fused: auto`` takes it
where torch has it for the parameters' device (CPU, CUDA) and for plain tensors; elsewhere (Ascend NPU,
FSDP's sharded DTensors) torch's own default stays.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICES = frozenset({"cpu", "cuda"})


def wants_fused(params: list) -> bool:
    """True when every parameter is a plain floating tensor on a device torch's fused AdamW supports."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    if not tensors:
        return False
    plain = all(type(p) in (torch.nn.Parameter, torch.Tensor) for p in tensors)
    return plain and {p.device.type for p in tensors} <= FUSED_DEVICES and all(p.is_floating_point() for p in tensors)


def adamw(
    params: Iterable,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    fused: bool | str | None = "auto",
) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or parameter groups); ``fused``: ``auto`` (see the module docstring),
    ``true``, ``false`` or ``null`` (torch's default)."""
    params = list(params)
    if fused == "auto":
        fused = True if wants_fused(params) else None
    elif fused is not None:
        fused = bool(fused)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
