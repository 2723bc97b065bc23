"""Peak memory of this process: resident set size, and CUDA memory allocated when a GPU is in use."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def peak_memory_mb() -> dict[str, float]:
    """``{"peak_rss_mb": ...}``, plus ``peak_cuda_mb`` (``torch.cuda.max_memory_allocated``) with CUDA."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / (1 << 20)
    return out
