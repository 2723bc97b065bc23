"""A CPU-backed stand-in for ``torch_npu`` and ``torch.npu``, injected by the tests only (never by ``src``).

What it fakes, and how:

* ``sys.modules["torch_npu"]``: a module with ``__version__``, ``npu`` (the namespace below) and
  ``npu_cross_entropy_loss``, computed with plain torch ops and checking the documented constraints of the real
  op (2-D float16/bfloat16/float32 input, int64 targets, 1 to 200,000 rows; returns loss, log_prob and two empty
  tensors for the unsupported z-loss outputs).
* ``torch.npu``: ``device_count``, ``is_available``, ``set_device``, ``current_device``, the memory statistics
  (``memory_stats``, ``memory_allocated``, ``max_memory_allocated``, ``reset_peak_memory_stats``),
  ``synchronize`` and ``empty_cache``; calls are recorded.
* ``kdpipe.accelerators.npu._torch_device``: NPU ``i`` becomes ``torch.device("cpu")`` (indices recorded), so
  tensors "on the NPU" are CPU tensors, and every CPU tensor counts as on the NPU while the stand-in is in place.
* ``torch.autocast``: the ``npu`` device type is run as CPU autocast (the requested types are recorded), so the
  ``trainer=npu`` config's ``MixedPrecision("bf16-mixed", device="npu")`` runs unchanged, as bf16 CPU autocast.

What it cannot show: anything about real NPU kernels, numerics, memory or speed, HCCL, or CANN. Everything is
undone by ``monkeypatch`` when the test ends.
"""

from __future__ import annotations

import importlib.abc
import sys
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

import pytest
import torch

import kdpipe.accelerators.npu as npu_accel
from kdpipe.accelerators import register

MAX_ROWS = 200_000  # the real op's documented limit on N


@dataclass
class StandinNPU:
    """The stand-in's state: how many NPUs it shows, what was called, and its fake memory statistics."""

    count: int = 2
    current: int = 0
    calls: list[tuple] = field(default_factory=list)  # (name, args) of every torch.npu call
    devices: list[int] = field(default_factory=list)  # indices passed to _torch_device
    autocast_types: list[str] = field(default_factory=list)  # device types asked of torch.autocast
    fused_ce_rows: list[int] = field(default_factory=list)  # rows of each npu_cross_entropy_loss call
    stats: dict = field(
        default_factory=lambda: {
            "allocated_bytes.all.current": 1 << 20,
            "allocated_bytes.all.peak": 3 << 20,
            "reserved_bytes.all.current": 4 << 20,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }
    )

    def device(self, index: int) -> torch.device:
        """Replaces ``_torch_device``: the stand-in's NPU ``index`` is the CPU."""
        self.devices.append(int(index))
        return torch.device("cpu")

    def called(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]


def _namespace(state: StandinNPU) -> SimpleNamespace:
    """The fake ``torch.npu``."""

    def record(name, result=None):
        def fn(*args, **kwargs):
            state.calls.append((name, args))
            return result() if callable(result) else result

        return fn

    def set_device(device) -> None:
        state.calls.append(("set_device", (device,)))
        index = device.index if isinstance(device, torch.device) else int(device)
        state.current = index or 0

    return SimpleNamespace(
        device_count=lambda: state.count,
        is_available=lambda: state.count > 0,
        set_device=set_device,
        current_device=lambda: state.current,
        memory_stats=record("memory_stats", lambda: dict(state.stats)),
        memory_allocated=record("memory_allocated", lambda: state.stats["allocated_bytes.all.current"]),
        max_memory_allocated=record("max_memory_allocated", lambda: state.stats["allocated_bytes.all.peak"]),
        reset_peak_memory_stats=record("reset_peak_memory_stats"),
        synchronize=record("synchronize"),
        empty_cache=record("empty_cache"),
    )


def _fused_cross_entropy(state: StandinNPU):
    """``torch_npu.npu_cross_entropy_loss`` in plain torch, with the real op's input checks."""

    def npu_cross_entropy_loss(
        input,
        target,
        weight=None,
        reduction="mean",
        ignore_index=-100,
        label_smoothing=0.0,
        lse_square_scale_for_zloss=0.0,
        return_zloss=False,
    ):
        if input.dim() != 2 or input.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise RuntimeError(f"npu_cross_entropy_loss: input must be [N, C] fp16/bf16/fp32, got {input.dtype}")
        if target.dtype != torch.int64 or target.shape != input.shape[:1]:
            raise RuntimeError("npu_cross_entropy_loss: target must be int64 [N]")
        if not 0 < input.shape[0] <= MAX_ROWS:
            raise RuntimeError(f"npu_cross_entropy_loss: N must be in (0, {MAX_ROWS}], got {input.shape[0]}")
        if weight is not None or label_smoothing or lse_square_scale_for_zloss or return_zloss:
            raise NotImplementedError("the stand-in covers what kdpipe uses: no weight, smoothing or z-loss")
        state.fused_ce_rows.append(int(input.shape[0]))
        log_prob = input.float().log_softmax(-1).to(input.dtype)
        keep = target != ignore_index
        picked = log_prob.gather(-1, torch.where(keep, target, 0)[:, None]).squeeze(-1)
        loss = torch.where(keep, -picked, 0.0)
        if reduction == "sum":
            loss = loss.sum().reshape(1)
        elif reduction == "mean":
            loss = (loss.sum() / keep.sum().clamp(min=1)).reshape(1)
        empty = input.new_empty(0)
        return loss, log_prob, empty, empty

    return npu_cross_entropy_loss


def install(monkeypatch: pytest.MonkeyPatch, count: int = 2, fused_ce: bool = True) -> StandinNPU:
    """Put the stand-in in place for one test (``monkeypatch`` undoes it) and register the accelerator."""
    state = StandinNPU(count=count)
    namespace = _namespace(state)
    module = ModuleType("torch_npu")
    module.__version__ = torch.__version__.split("+")[0]
    module.npu = namespace
    if fused_ce:
        module.npu_cross_entropy_loss = _fused_cross_entropy(state)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", namespace, raising=False)
    monkeypatch.setattr(npu_accel, "_torch_device", state.device)

    base = torch.autocast

    class StandinAutocast(base):
        """``torch.autocast`` with the ``npu`` device type run as CPU autocast."""

        def __init__(self, device_type, *args, **kwargs):
            state.autocast_types.append(str(device_type))
            super().__init__("cpu" if device_type == "npu" else device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", StandinAutocast)
    register()
    return state


class _FailingImport(importlib.abc.MetaPathFinder):
    """Makes ``import torch_npu`` raise ``error``, like an installed torch_npu whose CANN libraries are missing."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.attempts = 0

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torch_npu":
            self.attempts += 1
            raise self.error
        return None


def torch_npu_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a machine without torch_npu (``import torch_npu`` raises ModuleNotFoundError)."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.delattr(torch, "npu", raising=False)


def torch_npu_without_cann(monkeypatch: pytest.MonkeyPatch) -> _FailingImport:
    """Simulate torch_npu installed but CANN not sourced: the import fails on CANN's shared library, the
    variables set_env.sh exports are unset."""
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delattr(torch, "npu", raising=False)
    for name in npu_accel.CANN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    finder = _FailingImport(
        ImportError(
            "libhccl.so: cannot open shared object file: No such file or directory. Please check that the cann "
            "package is installed. Please run 'source set_env.sh' in the CANN installation path."
        )
    )
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    return finder
