"""Test-only helpers that configs can point at (``_target_: tests.helpers.X``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class CrashAt(L.Callback):
    """Raise once in the middle of one stage, like a killed process; ``marker`` records that it happened."""

    def __init__(self, stage: str, step: int, marker: str) -> None:
        self.stage, self.step, self.marker = stage, step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.marker.exists() or self.stage not in str(trainer.default_root_dir):
            return
        if trainer.global_step >= self.step:
            self.marker.touch()
            raise RuntimeError(f"simulated crash in {self.stage} at step {trainer.global_step}")
