"""Test-only (``PYTHONPATH=tests/write_audit``): log every file a process opens for writing or renames into place.

``KDPIPE_WRITE_AUDIT`` names a folder; each process appends to ``writes-<pid>.txt`` there: a first line
``rank <r>`` (from the launcher's ``RANK`` / ``LOCAL_RANK``, read at start: Lightning's launcher and torchrun set
them before Python starts), then ``open <path>`` / ``rename <path>`` lines. Python's audit hooks see every
``open`` through Python and every ``os.replace`` / ``os.rename``, so files written by native code (safetensors)
show up through the rename that puts them in place, which is how kdpipe writes them.
"""

import os
import sys

_FOLDER = os.environ.get("KDPIPE_WRITE_AUDIT")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


if _FOLDER:
    _rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    _log = open(os.path.join(_FOLDER, f"writes-{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115
    _log.write(f"rank {_rank}\n")

    def _hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike) and _writes(args[1], args[2]):
            _log.write(f"open {os.fsdecode(args[0])}\n")
        elif event == "os.rename":
            _log.write(f"rename {os.fsdecode(args[1])}\n")

    sys.addaudithook(_hook)
