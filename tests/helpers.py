"""Test-only helpers: tiny models, and classes that configs can point at (``_target_: tests.helpers.X``)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(tokenizer=None, *, seed: int | None = 0, **config) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden size 32) in eval mode, seeded with ``seed`` (None: the current RNG state);
    ``tokenizer`` sets the vocabulary size and pad id, and ``config`` replaces any ``LlamaConfig`` field."""
    fields = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2}  # fmt: skip
    if tokenizer is not None:
        fields.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    fields.update(config)
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


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


class CrashEveryRankAt(CrashAt):
    """:class:`CrashAt` on every rank of a multi-process run at the same step (one marker per rank, so no rank
    sees another's marker and trains on alone)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rank_marker = self.marker.with_name(f"{self.marker.name}.rank{trainer.global_rank}")
        CrashAt(self.stage, self.step, str(rank_marker)).on_train_batch_end(
            trainer, pl_module, outputs, batch, batch_idx
        )


@contextmanager
def _full_state_dicts_in_place():
    """Lightning's full state-dict context without ``offload_to_cpu``: torch's FSDP segfaults copying tensors
    to the CPU when they are on the CPU already (on a GPU, offloading is the point)."""
    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    def context(module, world_size: int, rank0_only: bool = True):
        return FSDP.state_dict_type(
            module=module,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        )

    with mock.patch.object(lightning_fsdp, "_get_full_state_dict_context", context):
        yield


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on CPU processes (gloo), so the FSDP path runs on machines without a GPU.

    Lightning refuses FSDP on a CPU accelerator (it checks for its exact class, so a subclass passes) and gives
    torch's FSDP ``device_id=None`` for a CPU device, which torch then refuses for want of an accelerator; this
    wraps with the CPU device itself, and gathers full state dicts without offloading them to the CPU (see
    :func:`_full_state_dicts_in_place`). Everything else (auto-wrap policy, precision, full state dicts,
    checkpoints, forward redirection of the step methods) is Lightning's own code."""

    def lightning_module_state_dict(self) -> dict:
        with _full_state_dicts_in_place():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict:
        with _full_state_dicts_in_place():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        with _full_state_dicts_in_place():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):  # as Lightning: no re-wrapping
            return model
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
