"""The base install pins no optuna and no SQLAlchemy (a user's current optuna, mlflow or SQLAlchemy-2 tool must
still install kdpipe); sweeps and clusters come with the `sweeps` extra, and asking for them without it says so."""

from __future__ import annotations

import re
from importlib.metadata import requires

from kdpipe.cli import train as cli_train


def _requirements() -> dict[str | None, set[str]]:
    """The installed kdpipe's requirements by extra (None: the base install), as package names."""
    found: dict[str | None, set[str]] = {}
    for line in requires("kdpipe") or []:
        extra = re.search(r"extra\s*==\s*['\"]([\w-]+)['\"]", line)
        name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
        found.setdefault(extra.group(1) if extra else None, set()).add(name)
    return found


def test_the_base_install_pins_no_optuna_sqlalchemy_or_sweep_plugins():
    by_extra = _requirements()
    assert not by_extra[None] & {"optuna", "sqlalchemy", "hydra-optuna-sweeper", "hydra-submitit-launcher"}
    assert "tensorboard" not in by_extra[None]
    assert {"hydra-optuna-sweeper", "optuna", "sqlalchemy", "hydra-submitit-launcher"} <= by_extra["sweeps"]
    assert "tensorboard" in by_extra["tensorboard"]
    assert by_extra["sweeps"] | by_extra["tensorboard"] | by_extra["real"] <= by_extra["dev"]  # tests run every path


def test_a_sweep_plugin_missing_from_the_environment_is_named_with_the_extra(monkeypatch):
    monkeypatch.setattr(cli_train.importlib.util, "find_spec", lambda name: None)
    assert cli_train.missing_sweep_plugin(["debug=fast", "hparams_search=kd_optuna"]) == "hparams_search=kd_optuna"
    assert cli_train.missing_sweep_plugin(["-m", "hydra/launcher=submitit_slurm"]) == "hydra/launcher=submitit_slurm"
    assert cli_train.missing_sweep_plugin(["hparams_search=null", "seed=1,2"]) is None


def test_with_the_sweeps_extra_installed_nothing_is_missing():
    assert cli_train.missing_sweep_plugin(["hparams_search=kd_optuna", "hydra/launcher=submitit_local"]) is None
