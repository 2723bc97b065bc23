"""``trainer.precision: auto``: per training stage, the faster precision for its model on this device.

Chosen by device where the device settles it, measured where only the model can:

- **CUDA**: ``bf16-mixed`` where the GPU computes in bf16 natively (Ampere and newer, ROCm), else ``16-mixed``
  (fp16 with loss scaling). No probe: on a GPU without bf16 units bf16 is emulated and fp16 is the fast path.
- **Ascend NPU**: the precision plugin the ``trainer=npu`` configs give (``bf16-mixed`` autocast on ``npu``);
  without one, ``bf16-mixed`` where torch_npu reports bf16 support, else ``16-mixed``.
- **CPU**: ``32-true`` where torch has no bf16 fast path on this CPU (oneDNN's bf16 kernels need AVX-512 or AMX
  on x86, the BF16 extension on Arm: without them bf16 autocast is emulated, several times slower). Where it
  has one, whether bf16 autocast pays depends on the model (a small model loses more in casts than its
  matrices gain), so the stage *measures* (:func:`probe_cpu_precision`): a few training steps of its own
  module (forward, backward, the trainer's gradient clipping and the optimizer step) on a deep copy, on a batch
  of its own shape, fp32 and bf16 interleaved after a warm-up, within :data:`PROBE_BUDGET_S`; bf16 is kept only
  when more than :data:`BF16_MARGIN` times faster (fp32 is exact).

The stage records the choice, how it was made and the probe's step times in its metrics, its log and
``<stage>/precision.json``; a resumed stage reads that file and does not measure again
(:func:`resolve_stage_precision`). A shared stage's identity holds the precision as far as it is known before
the stage runs (:func:`identity_precision`).
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdpipe.utils.dist import is_rank_zero, run_on_rank_zero
from kdpipe.utils.io import atomic_write_json, read_json

AUTO = "auto"
FP32, BF16, FP16 = "32-true", "bf16-mixed", "16-mixed"
CPU_CANDIDATES = (FP32, BF16)
BF16_MARGIN = 1.05  # bf16 must be more than this much faster than exact fp32 to be chosen
PROBE_BUDGET_S = 4.0  # the probe's timed rounds stop once this much wall time has passed (at least one round)
PROBE_MAX_ROUNDS = 5  # timed steps per candidate at most; each candidate's figure is its fastest
HOPELESS = 2.0  # a candidate whose warm-up step is this many times the fastest one's is not timed further
MEASURED = "auto:cpu-probe"  # a shared stage's identity where the CPU probe decides (see identity_precision)
PRECISION_FILE = "precision.json"


def is_auto(trainer_cfg: DictConfig) -> bool:
    return str(trainer_cfg.get("precision")) == AUTO


def cpu_bf16_supported() -> bool:
    """Whether torch has a bf16 fast path on this CPU (oneDNN: AVX-512 BW/VL/DQ or AMX on x86, BF16 on Arm).
    A torch without the check offers bf16 to the probe, which then decides."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN, or without the check
        return True


def cpu_candidates() -> tuple[str, ...]:
    """The precisions worth timing on this CPU: fp32 always, bf16 autocast where it has a fast path."""
    return CPU_CANDIDATES if cpu_bf16_supported() else (FP32,)


def cuda_bf16_supported() -> bool:
    """Native bf16 on the current CUDA device (not torch's emulation on older GPUs)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before including_emulation: it reported native support only
        return bool(torch.cuda.is_bf16_supported())


def npu_bf16_supported() -> bool:
    """bf16 on the Ascend NPU: torch_npu's report, where it has one (else True, as the ``trainer=npu`` configs
    assume)."""
    from kdpipe.accelerators import require_npu  # lazy: torch_npu fails to import without CANN

    check = getattr(getattr(require_npu(), "npu", None), "is_bf16_supported", None)
    return bool(check()) if check is not None else True


def has_precision_plugin(trainer_cfg: DictConfig) -> bool:
    """Whether the config gives a precision plugin (the NPU configs' ``MixedPrecision`` on ``npu``)."""
    targets = [str(p.get("_target_", "")) for p in trainer_cfg.get("plugins") or [] if hasattr(p, "get")]
    return any("precision" in target.lower() for target in targets)


@dataclass(frozen=True)
class DeviceChoice:
    """What the device alone says about ``auto``: ``precision`` (None: the plugin's, or Lightning's default),
    or ``measure`` (a CPU with a bf16 fast path: the probe decides)."""

    device: str
    precision: str | None = None
    measure: bool = False


def device_choice(trainer_cfg: DictConfig) -> DeviceChoice:
    """``auto`` as far as the device decides it (no model needed)."""
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():  # e.g. Lightning's "gpu" on Apple's MPS: its default precision
            return DeviceChoice(accelerator)
        return DeviceChoice("cuda", BF16 if cuda_bf16_supported() else FP16)
    if accelerator == "npu":
        if has_precision_plugin(trainer_cfg):
            return DeviceChoice("npu")  # the config's plugin (bf16 autocast on npu) stands
        return DeviceChoice("npu", BF16 if npu_bf16_supported() else FP16)
    if accelerator in ("cpu", "auto"):
        return DeviceChoice("cpu", measure=True) if len(cpu_candidates()) > 1 else DeviceChoice("cpu", FP32)
    return DeviceChoice(accelerator)  # another accelerator (tpu, mps, ...): Lightning's default


def identity_precision(trainer_cfg: DictConfig):
    """The precision a shared stage's identity holds (stable before, during and after the stage): the
    configured one; for ``auto`` what the device decides; where a CPU probe decides, :data:`MEASURED` (the
    first job that trains the shared stage measures, and its result, with its choice in ``metrics.json``, is
    reused like a resumed stage reuses its recorded choice)."""
    if not is_auto(trainer_cfg):
        return trainer_cfg.get("precision")  # as configured (so a configured precision keeps its identity)
    choice = device_choice(trainer_cfg)
    return MEASURED if choice.measure else choice.precision


# --- the CPU probe -----------------------------------------------------------------------------------------


def probe_batch(
    collate: Callable[[list], dict], examples: Sequence, batch_size: int, max_tokens: int | None = None
) -> dict:
    """A batch of the stage's shape: ``batch_size`` examples drawn at random (seeded; the curriculum's first
    batches may be its shortest), or as many as fit ``max_tokens`` when packing, through the stage's own
    collator, so padding or packing, label masks and teacher fields are those of its training batches."""
    if not examples:
        raise ValueError("the probe needs at least one training example")
    order = random.Random(0).sample(range(len(examples)), len(examples))
    if max_tokens is None:
        picked = [examples[i] for i in order[:batch_size]]
    else:
        picked, tokens = [], 0
        for i in order:
            if picked and tokens + len(examples[i].input_ids) > max_tokens:
                break
            picked.append(examples[i])
            tokens += len(examples[i].input_ids)
    return collate(picked)


def _optimizer(module) -> torch.optim.Optimizer:
    """The stage's optimizer (kdpipe's modules: ``optimizer_factory``, at their weight decay) over the
    trainable parameters; AdamW for another module."""
    params = [p for p in module.parameters() if p.requires_grad]
    factory = getattr(module, "optimizer_factory", None)
    if factory is None:
        return torch.optim.AdamW(params, lr=1e-4)
    return factory([{"params": params, "weight_decay": float(getattr(module, "weight_decay", 0.0))}])


def _train_step(module, optimizer, batch: dict, precision: str, clip: float | None) -> float:
    """Seconds of one training step as Lightning runs it in ``precision`` on a CPU: ``training_step`` under
    autocast (bf16-mixed), backward, norm clipping, optimizer step, gradients cleared."""
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16) if precision == BF16 else nullcontext():
        loss = module.training_step(batch, 0)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


@dataclass
class ProbeResult:
    """Seconds per training step of each candidate (its fastest timed step; a candidate dropped after the
    warm-up keeps its warm-up step), the timed rounds, and the probe's wall time."""

    seconds: dict[str, float]
    rounds: int
    wall_s: float


def probe_cpu_precision(
    module,
    batch: dict,
    candidates: Sequence[str] = CPU_CANDIDATES,
    *,
    clip: float | None = None,
    budget_s: float = PROBE_BUDGET_S,
    max_rounds: int = PROBE_MAX_ROUNDS,
) -> ProbeResult:
    """Time training steps of ``module`` (a LightningModule with ``training_step``) on ``batch`` in each of
    ``candidates``. Works on a deep copy with its own optimizer: the module's weights, gradients and optimizer
    are untouched, and the RNG state is restored. An untimed first step (the optimizer's state, first
    allocations), then one warm-up step each (kernel selection, autocast's first casts); a candidate more than
    :data:`HOPELESS` times slower than the fastest there is not timed further. Then interleaved rounds (the
    order alternating, so that drift or a busy machine hits all alike) until ``budget_s`` has passed since the
    start (at least one round) or ``max_rounds``."""
    started = time.perf_counter()
    rng = torch.get_rng_state()
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; no Trainer here
            probe = copy.deepcopy(module)
            probe.train()
            optimizer = _optimizer(probe)
            _train_step(probe, optimizer, batch, candidates[0], clip)  # the optimizer's state, first allocations
            warm = {p: _train_step(probe, optimizer, batch, p, clip) for p in candidates}
            fastest = min(warm.values())
            timed = [p for p in candidates if warm[p] <= HOPELESS * fastest]
            steps: dict[str, list[float]] = {p: [] for p in timed}
            rounds = 0
            while len(timed) > 1 and rounds < max_rounds:
                for p in timed if rounds % 2 == 0 else reversed(timed):
                    steps[p].append(_train_step(probe, optimizer, batch, p, clip))
                rounds += 1
                if time.perf_counter() - started > budget_s:
                    break
        seconds = {p: min(steps[p]) if steps.get(p) else warm[p] for p in candidates}
        return ProbeResult(seconds, rounds, time.perf_counter() - started)
    finally:
        torch.set_rng_state(rng)


def choose(seconds: dict[str, float], margin: float = BF16_MARGIN) -> str:
    """bf16-mixed only when it is more than ``margin`` times faster than fp32; fp32 otherwise (it is exact)."""
    if BF16 in seconds and seconds[FP32] > margin * seconds[BF16]:
        return BF16
    return FP32


# --- per stage ---------------------------------------------------------------------------------------------


def resolve_precision(trainer_cfg: DictConfig, module, make_batch: Callable[[], dict]) -> tuple[str | None, dict]:
    """The precision a stage trains in, and how it was chosen (for its metrics).

    A configured precision other than ``auto`` is kept as it is (no info). ``auto``: by device, or on a CPU with
    a bf16 fast path, by :func:`probe_cpu_precision` on ``make_batch()`` (rank 0 measures, every rank uses its
    result). ``make_batch`` is only called when the probe runs."""
    if not is_auto(trainer_cfg):
        return trainer_cfg.get("precision"), {}
    choice = device_choice(trainer_cfg)
    info: dict = {"precision_configured": AUTO, "precision_device": choice.device}
    if not choice.measure:
        return choice.precision, {**info, "precision_chosen_by": "device"}
    clip = trainer_cfg.get("gradient_clip_val")

    def measure() -> ProbeResult:
        return probe_cpu_precision(module, make_batch(), cpu_candidates(), clip=float(clip) if clip else None)

    result = run_on_rank_zero(measure)
    info.update(
        precision_chosen_by="probe",
        probe_s_per_step_fp32=result.seconds[FP32],
        probe_s_per_step_bf16=result.seconds[BF16],
        probe_rounds=result.rounds,
        probe_seconds=result.wall_s,
        probe_bf16_margin=BF16_MARGIN,
    )
    return choose(result.seconds), info


def describe(precision: str | None, info: dict) -> str:
    """One log line: the stage's precision and why."""
    how = info.get("precision_chosen_by")
    text = f"precision {precision or 'default'}"
    if how == "probe":
        fp32, bf16 = info["probe_s_per_step_fp32"], info["probe_s_per_step_bf16"]
        text += (
            f" (auto, measured: {fp32 * 1e3:.1f} ms/step fp32, {bf16 * 1e3:.1f} ms/step bf16, fp32/bf16 "
            f"{fp32 / bf16:.2f}; bf16 needs > {info.get('probe_bf16_margin', BF16_MARGIN)})"
        )
    elif how == "device":
        text += f" (auto, by device: {info.get('precision_device')})"
    else:
        text += " (configured)"
    return text + (f", recorded in {PRECISION_FILE} and reused" if info.get("precision_reused") else "")


def resolve_stage_precision(
    trainer_cfg: DictConfig, module, make_batch: Callable[[], dict], record: Path
) -> tuple[str | None, dict]:
    """:func:`resolve_precision`, once per stage: ``auto``'s choice goes to ``record`` (``<stage>/precision.json``,
    written by rank 0) and a resumed stage reads it back instead of measuring again (rank 0 reads it, so every
    rank takes the same precision). A configured precision other than ``auto`` is used as given."""
    if not is_auto(trainer_cfg):
        return resolve_precision(trainer_cfg, module, make_batch)
    found = run_on_rank_zero(lambda: read_json(record) if record.exists() else None)
    if found is not None:
        return found["precision"], {**found["info"], "precision_reused": True}
    precision, info = resolve_precision(trainer_cfg, module, make_batch)
    if is_rank_zero():
        atomic_write_json(record, {"precision": precision, "info": info})
    return precision, info
