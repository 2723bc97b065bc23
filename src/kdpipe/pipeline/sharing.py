"""Stages shared between runs (``share: true``): train once, reuse everywhere the inputs are the same.

The typical case is the teacher of a sweep: every job trains the same teacher on the same data with the same
(pinned) seed, so the first job trains it and the others reuse its export. A shared stage's identity is a
hash of everything that determines its result: the stage's settings, the model and data configs, the trainer
settings (``precision: auto`` as far as the device resolves it), its seed, and the weights it starts from.
Results live in ``<log_dir>/shared/<stage>-<hash>/`` (``export/``, ``metrics.json`` and ``identity.json``),
published atomically once the stage has finished.

Concurrent jobs (a multirun on submitit or SLURM) that need the same shared stage do not all train it: the
first takes an exclusive ``flock`` on ``shared/.<stage>-<hash>.lock`` while it trains and publishes, and the
others wait for the lock, then find the published result (:func:`kdpipe.utils.claim.claim_shared`). The OS
drops the lock when its holder dies, so a crashed job never blocks the others (the next one trains instead).
The ``score`` stage claims each teacher store the same way (``.<store>.lock`` beside it). Publishing is
atomic all the same: each job writes its own temp folder and the first rename wins (for filesystems where
``flock`` is not shared between machines, the worst case is duplicated work, never a broken folder). A folder
is only reused when its ``identity.json`` equals this stage's identity, not on the strength of the hash alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console

from kdpipe.data.scorers import needs_store
from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.precision import identity_precision
from kdpipe.pipeline.result import StageResult, slot_key
from kdpipe.utils.io import atomic_dir, atomic_write_json, read_json, sha256_tree

console = Console()


def shared_identity(ctx) -> dict:
    """What determines a stage's result (``ctx``: a :class:`~kdpipe.pipeline.stages.StageContext`)."""
    return {
        "stage": OmegaConf.to_container(ctx.settings, resolve=True),  # eval settings too: metrics are reused
        "model": OmegaConf.to_container(ctx.model_cfg, resolve=True),
        "data": OmegaConf.to_container(ctx.data, resolve=True),
        # ``precision: auto`` as the device resolves it: the identity of the precision it trains in (or MEASURED)
        "trainer": {
            **OmegaConf.to_container(ctx.cfg.trainer, resolve=True),
            "precision": identity_precision(ctx.cfg.trainer),
        },
        "seed": ctx.seed,
        "starts_from": sha256_tree(ctx.start_from) if ctx.start_from is not None else None,
        # the stores it reads (a kd stage's, or a curriculum scorer's): store names embed their hashes; label
        # stores keyed as kdpipe 0.1 did (``fast``), stores of rollouts by the rollout stage too
        # (``fast:rollouts:rollout_fast``). A stage that reads none has none here, so an SFT stage is shared
        # between orders that do and do not score a store before it
        "stores": dict(sorted((slot_key(slot), p.name) for slot, p in ctx.stores.items())) if reads_stores(ctx) else {},
    }


def reads_stores(ctx) -> bool:
    """Whether the stage reads a teacher store: a kd stage, or a stage whose curriculum scorer does."""
    return ctx.spec.kind == "kd" or needs_store(ctx.settings.get("curriculum") or {})


def shared_dir(ctx) -> Path:
    """Where the shared result of this stage lives (whether or not it exists yet)."""
    identity = json.dumps(shared_identity(ctx), sort_keys=True, default=str)
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return Path(str(ctx.cfg.paths.log_dir)).expanduser().resolve() / "shared" / f"{ctx.spec.name}-{key}"


def find_shared(ctx) -> StageResult | None:
    """The result of a finished shared stage with the same identity (its metrics and export), or None."""
    root = shared_dir(ctx)
    if not (root / "metrics.json").exists() or not (root / "export").is_dir():
        return None
    identity = json.loads(json.dumps(shared_identity(ctx), default=str))  # as identity.json stores it
    if (root / "identity.json").exists() and read_json(root / "identity.json") != identity:
        saved = read_json(root / "identity.json")
        differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise PipelineConfigError(
            f"stage {ctx.spec.name!r}: the shared folder {root} holds another stage's result (differs in "
            f"{differ}); remove it to train this one"
        )
    metrics = read_json(root / "metrics.json")
    console.print(f"[green]stage {ctx.spec.dirname}: reusing the shared result in {root}")
    return StageResult({**metrics, "shared_from": str(root)}, export=root / "export")


def publish_shared(ctx, result: StageResult) -> Path:
    """Copy a finished stage's export and metrics into its shared folder (atomically: all or nothing)."""
    root = shared_dir(ctx)
    with atomic_dir(root, replace=False) as tmp:  # the first job's wins (never replaces a folder in use)
        shutil.copytree(result.export, tmp / "export")
        atomic_write_json(tmp / "metrics.json", result.metrics)
        atomic_write_json(tmp / "identity.json", shared_identity(ctx))
    return root
