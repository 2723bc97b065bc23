"""Ascend NPU support: a Lightning ``Accelerator`` for ``torch_npu``, registered as ``"npu"``, and its checks.

Nothing here imports ``torch_npu`` when this module is imported or when :func:`register` runs: an installed
``torch_npu`` without the CANN toolkit sourced fails to import (and, through PyTorch's device-backend autoload,
can break ``import torch`` itself), so ``torch_npu`` is imported only when an NPU is asked for, and a failure
becomes an :class:`NPUUnavailableError` that says what to install or to source.

Lightning infers neither a strategy nor a precision plugin for a custom accelerator (it falls back to a CPU
single-device strategy, gloo DDP and CUDA autocast), so the ``trainer=npu`` / ``trainer=npu_ddp`` configs give
them explicitly: ``SingleDeviceStrategy(device=npu_device(0))`` or ``DDPStrategy(process_group_backend="hccl")``,
and ``MixedPrecision("bf16-mixed", device="npu")``.

Honesty note: this code is tested with a CPU-backed stand-in for ``torch_npu`` / ``torch.npu``
(``tests/npu_standin.py``), not on Ascend hardware. The stand-in redirects :func:`_torch_device`, the one place an
NPU index becomes a ``torch.device``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException

log = logging.getLogger(__name__)

NAME = "npu"
CANN_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
CANN_ENV_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")  # what sourcing set_env.sh exports
# words in an import error that point at CANN's shared libraries (e.g. "libhccl.so: cannot open shared object")
_CANN_HINTS = ("libhccl", "libascend", "libacl", "libge_", "libopapi", "libruntime", "set_env", "shared object", ".so:")


class NPUUnavailableError(RuntimeError):
    """An NPU was asked for but cannot be used here; the message says what to install or to source."""


def _torch_release() -> str:
    """This torch's release, e.g. ``2.13.0`` for ``2.13.0+cpu``."""
    return torch.__version__.split("+")[0]


def install_hint() -> str:
    """How to install the ``torch_npu`` that matches this torch (it pins torch exactly) and set up CANN."""
    release = _torch_release()
    return (
        f'pip install "torch_npu=={release}.*" (torch_npu pins torch exactly; this torch is {torch.__version__}; '
        f"the kdpipe[ascend] extra installs torch_npu but cannot pick the matching version for you), with Huawei's "
        f"CANN toolkit installed and sourced: `source {CANN_SET_ENV}` (docs/ascend.md)"
    )


def _load_failure(err: BaseException) -> str:
    """Explain a ``torch_npu`` that is installed but does not import."""
    text = f"{type(err).__name__}: {err}"
    unset = [name for name in CANN_ENV_VARS if not os.environ.get(name)]
    if isinstance(err, ImportError | OSError) and any(hint in str(err).lower() for hint in _CANN_HINTS):
        why = f"; {' and '.join(unset)} unset" if unset else ""
        return (
            f"torch_npu is installed but cannot load its CANN libraries ({text}): the CANN toolkit is missing or not "
            f"sourced in this shell{why}. Run `source {CANN_SET_ENV}` (or set_env.sh under your CANN install path) "
            f"and retry; install CANN first if it is not there (docs/ascend.md)"
        )
    return (
        f"torch_npu is installed but failed to import ({text}). Check that it matches torch {torch.__version__} "
        f"exactly and that CANN is sourced (`source {CANN_SET_ENV}`); to reinstall: {install_hint()}"
    )


def _import_torch_npu() -> ModuleType:
    """``import torch_npu``; any failure becomes an :class:`NPUUnavailableError` saying what to do."""
    try:
        return importlib.import_module("torch_npu")
    except ModuleNotFoundError as err:
        if err.name == "torch_npu":
            raise NPUUnavailableError(f"torch_npu is not installed: {install_hint()}") from err
        raise NPUUnavailableError(_load_failure(err)) from err
    except Exception as err:  # ImportError/OSError (CANN libraries), RuntimeError (e.g. a CUDA build of torch)
        raise NPUUnavailableError(_load_failure(err)) from err


def require_npu() -> ModuleType:
    """Import ``torch_npu`` and check that an NPU is visible; return ``torch.npu``.

    Raises :class:`NPUUnavailableError` (what to install or to source) otherwise.
    """
    torch_npu = _import_torch_npu()
    npu = getattr(torch, "npu", None)
    if npu is None:
        raise NPUUnavailableError(
            f"torch_npu {getattr(torch_npu, '__version__', '?')} imported but did not register torch.npu: it does "
            f"not match torch {torch.__version__}; {install_hint()}"
        )
    try:
        count = int(npu.device_count())
    except Exception as err:  # a driver problem surfaces here
        raise NPUUnavailableError(f"torch.npu.device_count() failed ({err}): check the driver, npu-smi info") from err
    if count < 1:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        raise NPUUnavailableError(
            "torch_npu imported but no NPU is visible (torch.npu.device_count() == 0): check the driver with "
            f"`npu-smi info`{f' and ASCEND_RT_VISIBLE_DEVICES={visible}' if visible is not None else ''}"
        )
    return npu


def npu_unavailable_reason() -> str | None:
    """None when an NPU can be used here, else why not (what to install or to source)."""
    try:
        require_npu()
    except NPUUnavailableError as err:
        return str(err)
    return None


def is_npu_available() -> bool:
    """Whether ``torch_npu`` imports and sees an NPU; never raises (False when torch_npu is missing)."""
    return npu_unavailable_reason() is None


def _torch_device(index: int) -> torch.device:
    """The ``torch.device`` of NPU ``index``: the one place an NPU index becomes a device object.

    ``torch.device("npu", i)`` is valid once ``torch_npu`` has registered its backend; the tests' CPU stand-in
    replaces this function (its "NPU" tensors are CPU tensors).
    """
    return torch.device(NAME, index)


def npu_device(index: int | None = None) -> torch.device:
    """The ``torch.device`` of NPU ``index`` (None: the current one), after :func:`require_npu`.

    The ``trainer=npu`` config builds its single-device strategy's device with it, so a missing ``torch_npu``
    gives :class:`NPUUnavailableError` rather than torch's "unknown device type npu".
    """
    npu = require_npu()
    return _torch_device(int(npu.current_device()) if index is None else int(index))


def is_npu_device(device: torch.device) -> bool:
    """Whether ``device`` is an NPU device (always False while ``torch_npu`` is not imported)."""
    if sys.modules.get("torch_npu") is None:
        return False
    try:
        return torch.device(device).type == _torch_device(0).type
    except RuntimeError:  # torch_npu imported but its backend not registered: nothing can be on an NPU
        return False


def resolve_device(name: str) -> torch.device:
    """A device name as the eval entry point takes it: ``auto`` (CUDA, else an NPU when one is usable, else CPU),
    ``npu`` / ``npu:<i>`` (through :func:`npu_device`), or anything ``torch.device`` takes (``cpu``, ``cuda:1``)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return npu_device() if is_npu_available() else torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind == NAME:
        return npu_device(int(index) if index else None)
    return torch.device(name)


def parse_npu_devices(devices: int | str | Sequence[int], available: int) -> list[int]:
    """Lightning's ``devices`` flag as NPU indices: ``n`` or ``"n"`` (the first n), ``-1`` / ``"-1"`` (all),
    ``"0,2"`` / ``"1,"`` / ``[0, 2]`` (those indices)."""
    if isinstance(devices, str):
        text = devices.strip()
        devices = [int(part) for part in text.split(",") if part.strip()] if "," in text else int(text)
    if isinstance(devices, int):
        if devices == -1:
            indices = list(range(available))
        elif devices >= 1:
            if devices > available:
                raise MisconfigurationException(f"asked for {devices} NPUs but {available} are visible")
            indices = list(range(devices))
        else:
            raise MisconfigurationException(f"devices={devices} is not a valid number of NPUs (a count >= 1, or -1)")
    else:
        indices = [int(i) for i in devices]
        if len(set(indices)) != len(indices):
            raise MisconfigurationException(f"NPU indices {indices} repeat an index")
        missing = [i for i in indices if not 0 <= i < available]
        if missing:
            raise MisconfigurationException(
                f"NPU index(es) {missing} not visible: {available} NPUs visible (indices 0..{available - 1}, after "
                "ASCEND_RT_VISIBLE_DEVICES)"
            )
    if not indices:
        raise MisconfigurationException("no NPU is visible")
    return indices


class NPUAccelerator(Accelerator):
    """Lightning accelerator for Ascend NPUs through ``torch_npu``, registered as ``"npu"`` (see :func:`register`).

    Construction imports ``torch_npu`` and fails with :class:`NPUUnavailableError` (what to install or source) when
    it cannot be used, so ``Trainer(accelerator="npu")`` fails before any training. Give the strategy and the
    precision explicitly (the ``trainer=npu`` / ``trainer=npu_ddp`` configs do): Lightning would otherwise pick a
    CPU single-device strategy (gloo for DDP) and CUDA autocast for a custom accelerator.

    Tested with a CPU-backed stand-in for ``torch_npu`` (tests/npu_standin.py), not on Ascend hardware.
    """

    def __init__(self) -> None:
        super().__init__()
        self._npu = require_npu()  # torch.npu

    def setup_device(self, device: torch.device) -> None:
        """Make ``device`` this process's current NPU."""
        if not is_npu_device(device):
            raise MisconfigurationException(f"Device should be an NPU, got {device} instead")
        self._npu.set_device(device)

    def setup(self, trainer: Any) -> None:
        """Log which NPUs this rank sees and start from an empty cache."""
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "all")
        log.info("LOCAL_RANK: %s - ASCEND_RT_VISIBLE_DEVICES: [%s]", trainer.local_rank, visible)
        self._npu.empty_cache()

    def teardown(self) -> None:
        """Release cached NPU memory."""
        self._npu.empty_cache()

    def get_device_stats(self, device: torch.device | str | int) -> dict[str, Any]:
        """``torch.npu.memory_stats(device)`` (allocated, reserved, peak bytes, allocation counts, ...)."""
        return dict(self._npu.memory_stats(device))

    @staticmethod
    def parse_devices(devices: int | str | Sequence[int]) -> list[int]:
        """The NPU indices a ``devices`` flag selects (see :func:`parse_npu_devices`)."""
        return parse_npu_devices(devices, NPUAccelerator.auto_device_count())

    @staticmethod
    def get_parallel_devices(devices: Sequence[int]) -> list[torch.device]:
        """One ``torch.device`` per NPU index."""
        return [_torch_device(int(i)) for i in devices]

    @staticmethod
    def auto_device_count() -> int:
        """The number of visible NPUs (0 when torch_npu cannot be used)."""
        try:
            return int(require_npu().device_count())
        except NPUUnavailableError:
            return 0

    @staticmethod
    def is_available() -> bool:
        """Whether torch_npu imports and sees an NPU; harmless (False) without torch_npu or CANN."""
        return is_npu_available()

    @staticmethod
    def name() -> str:
        return NAME

    @classmethod
    def register_accelerators(cls, accelerator_registry: Any) -> None:
        accelerator_registry.register(cls.name(), cls, description=f"{cls.__name__}: Ascend NPU through torch_npu")


def register() -> None:
    """Register :class:`NPUAccelerator` as ``"npu"`` in Lightning's accelerator registry.

    Idempotent, and imports no ``torch_npu``. kdpipe's entry points call it; notebooks call it before
    ``Trainer(accelerator="npu", ...)``. An ``"npu"`` registered by someone else is left in place (with a warning).
    """
    if NAME in AcceleratorRegistry:
        registered = AcceleratorRegistry[NAME]["accelerator"]
        if registered is not NPUAccelerator:
            log.warning("accelerator %r is already registered as %s: kdpipe's NPUAccelerator is not", NAME, registered)
        return
    NPUAccelerator.register_accelerators(AcceleratorRegistry)
