"""Turn down third-party chatter the entry points do not need (called by them, never on import)."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_WARNINGS = (
    r".*does not have many workers.*",  # num_workers=0 is the right choice for tiny CPU batches
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*smaller than the logging interval.*",
    r".*`tensorboardX` has been removed.*",
)


def quiet_third_party() -> None:
    """Hide progress bars of ``transformers`` weight loading, Lightning tips and known-harmless warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
