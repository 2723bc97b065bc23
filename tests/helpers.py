"""Test-only helpers: the tiny pipeline, the one way tests start a process, tiny models and stores, and
classes that configs can point at (``_target_: tests.helpers.X``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from kdpipe.data.arith import generate_split
from kdpipe.data.encode import encode_example
from kdpipe.lightning.launch import JOIN_ENV
from kdpipe.models.fingerprint import tokenizer_fingerprint
from kdpipe.modules.scorer import topk_signal
from kdpipe.store import codec
from kdpipe.store.fingerprint import data_fingerprint
from kdpipe.store.writer import StoreWriter
from kdpipe.types import IGNORE_INDEX
from kdpipe.utils.paths import config_dir

BIN = Path(sys.executable).parent  # the virtual environment's console scripts
REPO = Path(__file__).resolve().parents[1]

# --- the tiny pipeline ---------------------------------------------------------------------------------------

# the smallest real pipeline: tiny models and data, CSV logs, no progress bars (the `tiny_cfg` fixture's base)
TINY = ("debug=fast", "logger=csv", "callbacks=none", "print_config=false")


def compose_cfg(
    overrides: list[str], run_dir: Path | str | None = None, config_name: str = "train", hydra: bool = False
) -> DictConfig:
    """Compose a config exactly as ``kdpipe-train`` (or ``config_name``'s command) would, with the run directory
    pinned; ``hydra``: with the ``hydra`` node (sweeper, launcher), as a multirun composes it."""
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    return cfg


class TinyConfig:
    """The tiny pipeline (:data:`TINY`) with every output under ``root``: shared outputs (teacher stores under
    ``logs/stores``, shared stages under ``logs/shared``) and, unless ``run_dir`` says otherwise, the run in
    ``root/run``.

    ``tiny(*overrides)`` composes it in this process, as ``kdpipe-train`` would; ``tiny.args(*overrides)`` is
    the same pipeline as a ``kdpipe-train`` command line (for :func:`run_cli`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def args(self, *overrides: str) -> list[str]:
        return [*TINY, f"paths.root_dir={self.root}", *overrides]

    def __call__(self, *overrides: str, run_dir: Path | None = None) -> DictConfig:
        return compose_cfg(self.args(*overrides), run_dir or self.root / "run")


def added_stage(name: str, kind: str, **keys) -> list[str]:
    """Overrides that add stage ``name`` of ``kind`` to the tiny library (composed from its kind's defaults)
    with ``keys`` set, e.g. ``added_stage("rollout_teacher", "rollout", model="teacher")``; a key with dots
    (``filters.drop_truncated``) is passed as ``filters__drop_truncated``."""
    return [f"+stage@pipeline.stages.{name}={kind}"] + [
        f"pipeline.stages.{name}.{key.replace('__', '.')}={value}" for key, value in keys.items()
    ]


# sequence-level KD at tiny size: the teacher samples fast responses over the prompts (labels withheld) that a
# train_fraction=0.5 stage does not train on; a student trains on them (sft), and distils on them with the
# teacher's signal on the same sequences (a score stage over that rollout set, then kd)
_FIT = {"style": "fast", "data_from": "rollout_teacher", "max_steps": 4, "batch_size": 8, "val_every_n_steps": 2,
        "checkpoint_every_n_steps": 2, "eval__enabled": "false"}  # fmt: skip
_SYNTHETIC = {
    "rollout_teacher": ("rollout", {"model": "teacher", "style": "fast", "limit": 16, "max_new_tokens": 16,
                                    "batch_size": 16, "part_size": 8, "exclude_fraction": 0.5,
                                    "withhold_labels": "true", "filters__drop_truncated": "false"}),
    "score_teacher_rollouts": ("score", {"styles": "[fast]", "sequences": "rollouts", "k": 8, "batch_size": 16,
                                         "rollouts_from": "rollout_teacher", "shard_size": 32}),
    "sft_synthetic": ("sft", _FIT),
    "kd_synthetic": ("kd", _FIT),
}  # fmt: skip
TEACHER_ROLLOUTS = [
    override for name, (kind, keys) in _SYNTHETIC.items() for override in added_stage(name, kind, **keys)
]


def crash_override(stage: str, step: int, marker: Path, every_rank: bool = False) -> str:
    """A ``+callbacks.crash=...`` override: :class:`CrashAt` (or :class:`CrashEveryRankAt`) in ``stage``."""
    target = "CrashEveryRankAt" if every_rank else "CrashAt"
    return f"+callbacks.crash={{_target_: tests.helpers.{target}, stage: {stage}, step: {step}, marker: '{marker}'}}"


def store_of(run, stage: str, style: str, sequences: str = "labels") -> Path:
    """The teacher store stage ``stage`` of ``run`` (a :class:`~kdpipe.pipeline.state.PipelineRun`) scored (or
    reused) for ``style`` on ``sequences``."""
    (path,) = [ref.path for ref in run.result(stage).stores if (ref.style, ref.sequences) == (style, sequences)]
    return path


def assert_same_weights(reference: Path, other: Path, atol: float = 1e-6) -> None:
    """Two exports (``<dir>/model.safetensors``) hold the same tensors, within ``atol``."""
    ref, got = load_file(Path(reference) / "model.safetensors"), load_file(Path(other) / "model.safetensors")
    assert ref.keys() == got.keys()
    for key in ref:
        assert ref[key].shape == got[key].shape and torch.allclose(ref[key], got[key], atol=atol), key


# --- processes -----------------------------------------------------------------------------------------------

# what a launcher or an earlier test could leave in the environment: every process here starts clean
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", JOIN_ENV)


def cli_env(root: Path, audit: Path | None = None) -> dict[str, str]:
    """The environment :func:`run_cli` gives a process: outputs (``KDPIPE_ROOT``) and wandb's own folders under
    ``root``, wandb quiet and in the mode each config asks for, one thread per process, this checkout (and the
    write audit of ``tests/write_audit`` when ``audit`` names a folder) on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARS, "WANDB_MODE", "KDPIPE_WRITE_AUDIT")}
    paths = [str(REPO), *([str(REPO / "tests" / "write_audit")] if audit else []), env.get("PYTHONPATH", "")]
    env.update(
        KDPIPE_ROOT=str(root),
        WANDB_DIR=str(root / "wandb"),
        WANDB_CACHE_DIR=str(root / "wandb_cache"),
        WANDB_CONFIG_DIR=str(root / "wandb_config"),
        WANDB_DATA_DIR=str(root / "wandb_data"),
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",  # one and two processes compute with the same kernels; a busy machine stays usable
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
    )
    if audit is not None:
        audit.mkdir(parents=True, exist_ok=True)
        env["KDPIPE_WRITE_AUDIT"] = str(audit)
    return env


def run_cli(
    command: str | Path,
    *args: str,
    cwd: Path,
    check: bool = True,
    audit: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """The one way tests start a process: ``command`` (a console script of this environment by name, e.g.
    ``kdpipe-train``, ``torchrun``; or a path, e.g. ``sys.executable``) with ``args``, in ``cwd``, with
    :func:`cli_env` (outputs under ``cwd``), output captured. ``check``: fail the test, showing the output's
    tails, unless it exits with 0."""
    program = str(command) if os.sep in str(command) else str(BIN / str(command))
    proc = subprocess.run(
        [program, *map(str, args)],
        cwd=cwd,
        env=cli_env(Path(cwd), audit),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"{command} exited with {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


# --- tiny models and teacher stores --------------------------------------------------------------------------


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


def tiny_lm(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 1-layer Llama without a pad id: what generation and the student-loss scorer run on."""
    return tiny_llama(tokenizer, seed=seed, pad_token_id=None, num_hidden_layers=1, num_key_value_heads=1,
                      max_position_embeddings=256)  # fmt: skip


STORE_K = 8  # teacher entries per position in the stores :func:`write_store` writes


def encoded(tokenizer, n_per_level: int = 3, style: str = "reasoning"):
    """The built-in task's val split (``n_per_level`` per level) encoded in ``style``."""
    return [encode_example(tokenizer, e, style) for e in generate_split("val", n_per_level, seed=0)]


def fake_teacher_rows(example, vocab: int, seed: int):
    """Random but valid teacher rows for one example (one per label position)."""
    g = torch.Generator().manual_seed(seed)
    n = example.num_label_tokens
    logprobs = torch.log_softmax(torch.randn(n, vocab, generator=g) * 3, dim=-1)
    labels = torch.tensor([t for t in example.labels if t != IGNORE_INDEX])
    return topk_signal(logprobs, labels, STORE_K)


def write_store(path, tokenizer, examples, shard_size: int = 4, scheme: str = codec.DEFAULT_SCHEME):
    """A complete teacher store of :func:`fake_teacher_rows` for ``examples``; returns (codec spec, rows)."""
    spec = codec.make_spec(len(tokenizer), STORE_K, scheme=scheme)
    meta = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data_fingerprint(examples),
        "k": STORE_K,
        "temperature": 1.0,
        "teacher": {"weights_sha256": "test"},
    }
    writer = StoreWriter(path, examples, meta, spec, shard_size=shard_size)
    rows = {}
    for i in writer.pending_examples():
        rows[i] = fake_teacher_rows(examples[i], len(tokenizer), seed=i)
        writer.add(i, *rows[i])
    writer.finalize()
    return spec, rows


# --- classes configs point at --------------------------------------------------------------------------------


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


def third_party_chat(n: int = 12, *, numeric: bool = True) -> list[dict]:
    """Chat records as a third party writes them: a system turn, a question, a reply ending with "The answer
    is N." (``numeric=False``: replies without any number, e.g. open-ended chat)."""
    records = []
    for i in range(n):
        a, b = 3 + i, 5 + 2 * i
        question = f"Tom has {a} apples and buys {b} more. How many now?" if numeric else f"Say hello {i}"
        reply = f"{a} + {b} = {a + b}. The answer is {a + b}." if numeric else f"Hello there, friend {'x' * i}!"
        records.append(
            {
                "id": f"q{i}",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": reply},
                ],
            }
        )
    return records


def write_records(path: Path, records: list) -> Path:
    """Write records as JSON lines (strings as they are: a broken line is a string)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_data_overrides(path: Path) -> list[str]:
    """Overrides that point ``data=jsonl_chat`` at one file for every split."""
    return ["data=jsonl_chat", *[f"data.files.{split}={path}" for split in ("train", "val", "test")]]
