"""One clean line per user error, for every command: ``kdpipe-<cmd>: <kind> error: <message>`` on stderr and exit
status 2, no traceback (``KDPIPE_DEBUG=1``, or Hydra's ``HYDRA_FULL_ERROR=1``, shows the traceback instead).

A user error is a :class:`kdpipe.errors.KdpipeError` (its ``kind``), or one of the foreign errors that
:func:`user_error` names by kind: a teacher store's ``StoreError``, Lightning's and Hydra's refusals of a setting,
a missing device, and the ``OSError`` of a path that cannot be written, found or fitted. Anything else is a bug
and keeps its traceback. A message of several lines (a ``DataError`` listing bad records) keeps them after the
first.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from kdpipe.accelerators import NPUUnavailableError
from kdpipe.errors import KdpipeError
from kdpipe.store.reader import StoreError

DEBUG_VARS = ("KDPIPE_DEBUG", "HYDRA_FULL_ERROR")
# set while a command has Hydra raise its errors (see raising_hydra_errors): not the user asking for tracebacks
HYDRA_RAISES = "KDPIPE_HYDRA_RAISES"
# (error type, kind) per command: e.g. kdpipe-eval's KeyError for a key its data config lacks
Extra = Sequence[tuple[type[BaseException], str]]

PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
DISK = {errno.ENOSPC, errno.EDQUOT}
HYDRA_CHAINED = ", set env var HYDRA_FULL_ERROR=1 to see chained exception"  # KDPIPE_DEBUG=1 shows it
HYDRA_CONFIG = (ConfigCompositionException, MissingConfigException, OverrideParseException)


def debugging() -> bool:
    """Whether the user asked for tracebacks (``KDPIPE_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``)."""
    asked = [name for name in DEBUG_VARS if os.environ.get(name, "").strip() not in ("", "0")]
    if os.environ.get(HYDRA_RAISES):  # HYDRA_FULL_ERROR is ours (raising_hydra_errors), not the user's
        asked = [name for name in asked if name != "HYDRA_FULL_ERROR"]
    return bool(asked)


def os_error(err: OSError) -> tuple[str, str] | None:
    """``(kind, message)`` for a path that cannot be written (permission), found (file) or fitted (disk)."""
    if isinstance(err, PermissionError) or err.errno in PERMISSION:
        kind = "permission"
    elif err.errno in DISK:
        kind = "disk"
    elif isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)):
        kind = "file"
    else:
        return None
    if err.strerror and err.filename is not None:  # the OS's own error: "[Errno 13] ..." said plainly
        return kind, f"{err.strerror}: {str(err.filename)!r}"
    return kind, str(err)


def hydra_message(err: Exception) -> str:
    """Hydra's message without its search-path listing (and with the OmegaConf cause it points at)."""
    text = str(err).split("\nConfig search path:")[0].rstrip()
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause).splitlines()[0] not in text:
        text = f"{text}: {str(cause).splitlines()[0]}"
    return text


def instantiation_error(err: InstantiationException) -> tuple[str, str] | None:
    """A ``_target_`` that does not exist, or that refused its arguments, is a config error; a target that
    failed inside is whatever its cause is (a bug keeps its traceback)."""
    cause = err.__cause__
    if "Error locating target" in str(err) or (isinstance(cause, TypeError) and "argument" in str(cause)):
        return "config", str(err).replace(HYDRA_CHAINED, "").strip()
    return user_error(cause) if isinstance(cause, Exception) else None


def user_error(err: BaseException, extra: Extra = ()) -> tuple[str, str] | None:
    """``(kind, message)`` when ``err`` is an error the user can fix, else None (a bug: keep the traceback)."""
    for cls, kind in extra:
        if isinstance(err, cls):
            return kind, str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, KdpipeError):
        return err.kind, str(err)
    if isinstance(err, StoreError):
        return "store", str(err)
    if isinstance(err, NPUUnavailableError):
        return "device", str(err)
    if isinstance(err, MisconfigurationException):
        return "config", f"Lightning: {err}"
    if isinstance(err, HYDRA_CONFIG):
        return "config", hydra_message(err)
    if isinstance(err, InstantiationException):
        return instantiation_error(err)
    if isinstance(err, (MissingMandatoryValue, InterpolationResolutionError)):
        return "config", str(err).splitlines()[0]
    if isinstance(err, OSError):
        return os_error(err)
    return None


def error_line(prog: str, err: BaseException, extra: Extra = ()) -> str | None:
    """``<prog>: <kind> error: <message>`` for a user error, else None."""
    found = user_error(err, extra)
    return None if found is None else f"{prog}: {found[0]} error: {found[1]}"


def report_user_error(prog: str, err: BaseException, extra: Extra = (), debug: bool | None = None) -> bool:
    """Print ``err`` as one line on stderr and return True when it is a user error and the user did not ask for
    tracebacks (``debug``, default :func:`debugging`); False: the caller raises it."""
    line = None if (debugging() if debug is None else debug) else error_line(prog, err, extra)
    if line is not None:
        print(line, file=sys.stderr)
    return line is not None


@contextmanager
def exit_on_user_error(prog: str, extra: Extra = ()) -> Iterator[None]:
    """Run the body; a user error is printed as one line (:func:`error_line`) and exits with status 2, unless
    the user asked for tracebacks (:func:`debugging`: it is raised as it is)."""
    debug = debugging()
    try:
        yield
    except Exception as err:
        if not report_user_error(prog, err, extra, debug):
            raise
        sys.exit(2)


@contextmanager
def raising_hydra_errors() -> Iterator[None]:
    """Have ``hydra.main`` raise what fails inside it (a composition error, a run folder it cannot create)
    instead of printing its own report and exiting 1, so :func:`exit_on_user_error` can name it."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield  # the user's own setting (tracebacks), or ours already
        return
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ.update(HYDRA_FULL_ERROR="1", **{HYDRA_RAISES: "1"})
    try:
        yield
    finally:
        os.environ.pop(HYDRA_RAISES, None)
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def run_hydra_command(prog: str, entry: Callable[[], object], check: Callable[[], None] | None = None) -> None:
    """A Hydra console script: ``check`` (e.g. the command line's keys), then the ``hydra.main`` ``entry``,
    every user error of either printed as one line (exit status 2)."""
    with exit_on_user_error(prog):
        if check is not None:
            check()
        with raising_hydra_errors():
            entry()
