"""Where kdpipe's Hydra configs live: inside the package when installed, ``configs/`` in a checkout."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the Hydra config directory."""
    packaged = Path(__file__).resolve().parents[1] / "configs"
    if packaged.is_dir():
        return str(packaged)
    checkout = Path(__file__).resolve().parents[3] / "configs"
    if checkout.is_dir():
        return str(checkout)
    raise FileNotFoundError(f"kdpipe configs not found at {packaged} or {checkout}")
