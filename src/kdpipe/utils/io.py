"""Atomic file writes (a reader never sees a half-written file, and a crash leaves the old one intact), and
the sha256 helpers every fingerprint and checksum uses."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600, fixed below
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err


def temp_beside(path: str | Path, suffix: str = "") -> Path:
    """A fresh name beside ``path`` for this process's partial write (``.<name>.<pid>-<random>.tmp<suffix>``):
    concurrent writers never share one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix, so writers that go by it work) for a library that writes
    files itself (``savefig``, safetensors); renamed over ``path`` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; when the block ends it becomes ``path``. ``replace``: an
    existing folder is replaced; else the first writer wins and a later one's equivalent copy is dropped
    (several jobs publishing the same content). Removed if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    tmp.mkdir()
    try:
        yield tmp
        if replace:
            atomic_replace_dir(tmp, path)
        else:
            try:
                os.rename(tmp, path)  # atomic; fails if another writer published first
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a fully written directory into place, replacing any previous one."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = temp_beside(final_dir, ".old")
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, digest=None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (``digest``: a running hash to update instead)."""
    h = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Hex sha256 over every file below ``root`` (relative names and bytes, in sorted order)."""
    root, h = Path(root), hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(file.relative_to(root).as_posix().encode())
        sha256_file(file, h)
    return h.hexdigest()
