"""Claiming work several jobs may want at once (a shared stage, a teacher store): the first takes an exclusive
``flock`` and does it, the others wait and then reuse what it published. The OS drops the lock when its holder
dies, so a crashed job never blocks the others (the next one does the work instead)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from kdpipe.utils.dist import broadcast_object, is_rank_zero

console = Console()

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
