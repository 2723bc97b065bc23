"""The command line's keys, checked before Hydra runs anything: a key the config does not have is refused naming
the closest one (``unknown key 'sed' (did you mean 'seed'?)``), with or without ``+``.

Hydra itself refuses ``sed=3`` in a paragraph that suggests ``+sed=3``, and then runs ``+sed=3`` with the
default seed. Here the known keys are those of the config composed from the same config-group choices
(``pipeline=tiny``, ``experiment=...``, ``model@models.student=hf``), so keys a chosen config brings in are
known. Adding inside a known key (``+callbacks.crash=...``), config groups (``+stage@pipeline.stages.x=eval``)
and Hydra's own settings (``hydra.*``, ``hydra/...``) are left as they are.
"""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from kdpipe.errors import PipelineConfigError
from kdpipe.utils.paths import config_dir

# Hydra flags after which the next argument is their value, not an override
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p"}
# Hydra flags that change what is composed, or compose nothing: the check stands aside
OTHER_COMMAND = {
    *("--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc"),
    *("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"),
}
MAX_LISTED = 20  # known keys listed when none is close
MAX_COMPOSES = 4  # group-choice combinations of a sweep checked (each composes the config once)


def override_args(args: list[str]) -> list[str] | None:
    """The ``key=value`` arguments of a Hydra command line, or None when a flag makes it another command."""
    found, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in OTHER_COMMAND:
            return None
        elif arg in VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            found.append(arg)
    return found


def groups() -> set[str]:
    """Every config group (``data``, ``model``, ``curriculum/scorer``, ...): the folders of the config dir."""
    root = Path(config_dir())
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and not p.name.startswith("_")}


def is_hydra(override: Override) -> bool:
    key = override.key_or_group
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def is_group(override: Override, known_groups: set[str]) -> bool:
    """A config-group choice (``data=jsonl_chat``, ``model@models.teacher=hf``, ``~experiment``)."""
    return override.package is not None or override.key_or_group in known_groups


def group_choice_jobs(choices: list[Override]) -> list[list[str]]:
    """The distinct combinations of group choices a sweep (``pipeline=tiny,default``) runs, at most
    :data:`MAX_COMPOSES`; ``[[]]`` without any, ``[]`` for a sweep only Hydra's sweeper expands (``glob``)."""
    if not choices:
        return [[]]
    try:
        batches = BasicSweeper.split_arguments(choices, None)
    except HydraException:  # glob(*) needs Hydra's config loader: its jobs are left to Hydra's own checks
        return []
    return [list(job) for job in itertools.islice(itertools.chain.from_iterable(batches), MAX_COMPOSES)]


def keys_of(node: DictConfig) -> set[str]:
    """A config node's keys, those whose value is missing (``???``) included (``in`` leaves them out)."""
    return {str(key) for key in node}


def refusal(parts: list[str], siblings) -> str:
    """``unknown key 'a.b' (did you mean 'a.c'?)``: the closest of the keys beside it, if one is close."""
    names = sorted(siblings)
    match = difflib.get_close_matches(parts[-1], names, n=1, cutoff=0.6)
    if match:
        return f"unknown key {'.'.join(parts)!r} (did you mean {'.'.join([*parts[:-1], match[0]])!r}?)"
    listed = ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
    return f"unknown key {'.'.join(parts)!r} (the keys {'there' if len(parts) > 1 else 'at the top'}: {listed})"


def unknown_key(cfg: DictConfig, override: Override, top_level: set[str]) -> str | None:
    """The message for an override whose key ``cfg`` lacks, else None. ``+`` (add) may add inside a known
    top-level key; a plain change must name a key that exists, down to its last part."""
    parts = override.key_or_group.split(".")
    if parts[0] not in keys_of(cfg):
        return refusal(parts[:1], top_level)
    if override.is_add() or override.is_force_add():
        return None
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):  # a list, a value, null: Hydra's own checks apply
            return None
        if part not in keys_of(node):
            return refusal(parts[: depth + 1], keys_of(node))
        if OmegaConf.is_interpolation(node, part) or OmegaConf.is_missing(node, part):
            return None
        node = node[part]
    return None


def check_overrides(args: list[str], config_name: str) -> None:
    """Refuse, as a :class:`PipelineConfigError`, a command-line key that the ``config_name`` config composed
    with the command's group choices does not have, naming the closest known key."""
    given = override_args(args)
    if not given:
        return
    parsed = [o for o in OverridesParser.create().parse_overrides(given) if not is_hydra(o)]
    known_groups = groups()
    choices = [o for o in parsed if is_group(o, known_groups)]
    keys = [o for o in parsed if not is_group(o, known_groups) and not o.is_delete()]
    if not keys:
        return
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        for job in group_choice_jobs(choices):
            cfg = compose(config_name, overrides=job)
            top_level = keys_of(cfg) | {group.split("/")[0] for group in known_groups}
            for override in keys:
                message = unknown_key(cfg, override, top_level)
                if message is not None:
                    raise PipelineConfigError(message)
