"""The error every layer raises for input that cannot run: a config, a file, a store (caught by the commands)."""


class PipelineConfigError(ValueError):
    """A config, file or store that cannot run, named in one line; raised before any training starts."""
