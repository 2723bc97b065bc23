"""Lightning accelerators kdpipe adds: Ascend NPUs through ``torch_npu`` (imported lazily, never here)."""

from kdpipe.accelerators.npu import (
    NPUAccelerator,
    NPUUnavailableError,
    install_hint,
    is_npu_available,
    is_npu_device,
    npu_device,
    npu_unavailable_reason,
    register,
    require_npu,
    resolve_device,
)

__all__ = [
    "NPUAccelerator",
    "NPUUnavailableError",
    "install_hint",
    "is_npu_available",
    "is_npu_device",
    "npu_device",
    "npu_unavailable_reason",
    "register",
    "require_npu",
    "resolve_device",
]
