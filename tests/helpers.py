"""Test-only helpers that configs can point at (``_target_: tests.helpers.X``)."""

from __future__ import annotations

import lightning as L


class CrashAt(L.Callback):
    """Raise in the middle of one stage, like a killed process would stop it."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage, self.step = stage, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stage in str(trainer.default_root_dir) and trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash in {self.stage} at step {trainer.global_step}")
