"""The errors a user can fix, by kind: each layer raises them for input that cannot run (a config, a data file, a
teacher store), and every command prints one as a single line, ``kdpipe-<cmd>: <kind> error: <message>``, and
exits with status 2 (``kdpipe.cli.errors``; ``KDPIPE_DEBUG=1`` shows the traceback instead).

The kinds: ``config`` (:class:`PipelineConfigError`), ``data`` (:class:`DataError`, e.g. invalid records),
``store`` (:class:`StoreError`, a teacher store that is missing, corrupt or does not match). The commands also
name a few foreign errors by kind: a file that cannot be written (``permission``), found (``file``) or fitted
(``disk``), Lightning's and Hydra's refusals of a setting (``config``), a device that is not there (``device``).
"""


class KdpipeError(Exception):
    """Base of the errors a user can fix; ``kind`` names what to fix (``<kind> error: <message>``)."""

    kind = "input"


class PipelineConfigError(KdpipeError, ValueError):
    """A config, file or store that cannot run, named in one line; raised before any training starts."""

    kind = "config"


class DataError(KdpipeError, ValueError):
    """Data that cannot be used: invalid records (:class:`kdpipe.data.records.DataError` lists them), a
    predictions file, a split that tokenization leaves empty."""

    kind = "data"


class StoreError(KdpipeError, ValueError):
    """A teacher store that is missing, corrupt, or does not match the data it is used with."""

    kind = "store"
