"""Stages shared between runs (``share: true``): train once, reuse everywhere the inputs are the same.

The typical case is the teacher of a sweep: every job trains the same teacher on the same data with the same
(pinned) seed, so the first job trains it and the others reuse its export. A shared stage's identity is a
hash of everything that determines its result: the stage's settings, the model and data configs, the trainer
settings, its seed, and the weights it starts from. Results live in ``<log_dir>/shared/<stage>-<hash>/``
(``export/``, ``metrics.json`` and ``identity.json``), published atomically once the stage has finished.

Concurrent jobs (a multirun on submitit or SLURM) that need the same shared stage do not all train it: the
first takes an exclusive ``flock`` on ``shared/.<stage>-<hash>.lock`` while it trains and publishes, and the
others wait for the lock, then find the published result (:func:`claim_shared`). The OS drops the lock when
its holder dies, so a crashed job never blocks the others (the next one trains instead). The ``score``
stage claims each teacher store the same way (``.<store>.lock`` beside it). Publishing is
atomic all the same: each job writes its own temp folder and the first rename wins (for filesystems where
``flock`` is not shared between machines, the worst case is duplicated work, never a broken folder). A folder
is only reused when its ``identity.json`` equals this stage's identity, not on the strength of the hash alone.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from rich.console import Console

from kdpipe.pipeline.spec import PipelineConfigError
from kdpipe.utils.dist import broadcast_object, is_rank_zero
from kdpipe.utils.io import atomic_write_json, read_json

console = Console()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def shared_identity(ctx) -> dict:
    """What determines a stage's result (``ctx``: a :class:`~kdpipe.pipeline.stages.StageContext`)."""
    return {
        "stage": OmegaConf.to_container(ctx.settings, resolve=True),  # eval settings too: metrics are reused
        "model": OmegaConf.to_container(ctx.model_cfg, resolve=True),
        "data": OmegaConf.to_container(ctx.cfg.data, resolve=True),
        "trainer": OmegaConf.to_container(ctx.cfg.trainer, resolve=True),
        "seed": ctx.seed,
        "starts_from": _file_digest(ctx.start_from) if ctx.start_from is not None else None,
        "stores": {k: Path(v).name for k, v in sorted(ctx.stores.items())},  # store names embed their hashes
    }


def shared_dir(ctx) -> Path:
    """Where the shared result of this stage lives (whether or not it exists yet)."""
    identity = json.dumps(shared_identity(ctx), sort_keys=True, default=str)
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return Path(str(ctx.cfg.paths.log_dir)).expanduser().resolve() / "shared" / f"{ctx.spec.name}-{key}"


def find_shared(ctx) -> tuple[dict, Path] | None:
    """The (metrics, export) of a finished shared stage with the same identity, or None."""
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
    return {**metrics, "shared_from": str(root)}, root / "export"


def publish_shared(ctx, metrics: dict, export: Path) -> Path:
    """Copy a finished stage's export and metrics into its shared folder (atomically: all or nothing)."""
    root = shared_dir(ctx)
    tmp = root.with_name(f".{root.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # this process's own
    shutil.copytree(export, tmp / "export")
    atomic_write_json(tmp / "metrics.json", metrics)
    atomic_write_json(tmp / "identity.json", shared_identity(ctx))
    try:
        os.rename(tmp, root)  # atomic; fails if another job published first (never replaces a folder in use)
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        shutil.rmtree(tmp)  # theirs is equivalent
    return root


T = TypeVar("T")


class SharedLock:
    """An exclusive, non-blocking ``flock`` on ``<shared folder>.lock`` (released on :meth:`release` or when
    the process dies). The lock file itself is left in place: deleting it would race with other jobs."""

    def __init__(self, root: Path) -> None:
        self.path = root.with_name(f".{root.name}.lock")
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claim_shared(
    root: Path | None, find: Callable[[], T | None], poll_seconds: float = 5.0
) -> tuple[T | None, SharedLock | None]:
    """Either the published result (``find()`` on rank 0, the same on every rank) and no lock, or None and the
    lock this job now holds (rank 0; None on the other ranks) until it has trained and published the stage.
    ``root`` (the shared folder, see :func:`shared_dir`) and ``find`` are only used on rank 0.

    While another job holds the lock, every rank waits in short rounds (one small broadcast per round), so a
    long wait never runs into a process group's collective timeout."""
    announced = False
    while True:
        found, lock, busy = None, None, False
        if is_rank_zero():
            found = find()
            if found is None:
                assert root is not None, "rank 0 needs the shared folder"
                lock = SharedLock(root)
                if not lock.try_acquire():
                    lock, busy = None, True
                else:
                    found = find()  # published between the first look and the lock
                    if found is not None:
                        lock.release()
                        lock = None
        found, busy = broadcast_object((found, busy))
        if not busy:
            return found, lock
        if is_rank_zero() and not announced:
            console.print(f"[yellow]another job is training the shared stage {root.name}: waiting for it to publish")
            announced = True
        time.sleep(poll_seconds)


@contextmanager
def claimed(root: Path | None, find: Callable[[], T | None], poll_seconds: float = 5.0) -> Iterator[T | None]:
    """:func:`claim_shared` as a ``with`` block: yields the published result, or None when this job is to
    produce it, holding the lock until the block ends (also when it raises)."""
    found, lock = claim_shared(root, find, poll_seconds)
    try:
        yield found
    finally:
        if lock is not None:
            lock.release()
