"""What the stage loggers record: eval/ apart from stage/, the generations sample, a multirun job's overrides."""

from __future__ import annotations

import json

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf, open_dict

from kdpipe.lightning.loggers import log_results, make_loggers, sample_generations, sweep_job
from tests.helpers import compose_cfg


class Recorder:
    """A logger that keeps what it was given."""

    def __init__(self) -> None:
        self.hparams: list[dict] = []
        self.metrics: list[tuple[dict, int]] = []

    def log_hyperparams(self, params: dict) -> None:
        self.hparams.append(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((metrics, step))


def test_the_evaluation_goes_under_eval_and_an_inapplicable_accuracy_is_not_logged():
    evaluation = {"metric": "exact_match", "accuracy": None, "accuracy_by_level": {"1": 0.5}, "loss": 2.0}
    recorder = Recorder()
    log_results([recorder], {"steps": 6, "precision": "32-true", **evaluation}, step=6, evaluation=evaluation)
    ((numbers, step),) = recorder.metrics
    assert step == 6 and numbers == {"stage/steps": 6.0, "eval/accuracy_by_level/1": 0.5, "eval/loss": 2.0}
    assert recorder.hparams == [{"eval": {"metric": "exact_match"}}]  # strings as hyperparameters


def test_the_generations_sample_keeps_every_key_as_strings(tmp_path):
    path = tmp_path / "generations.jsonl"
    records = [{"id": "a", "level": 1, "reply": "x\ny", "prediction": None}, {"id": "b", "score": 0.5}, {"id": "c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    columns, rows = sample_generations(path, 2)
    assert columns == ["id", "level", "reply", "prediction", "score"]
    assert rows == [["a", "1", "x\ny", "", ""], ["b", "", "", "", "0.5"]]


def test_a_csv_logger_gets_the_sample_as_a_file_and_its_own_keys_stay_out_of_its_arguments(tmp_path):
    logger_cfg = OmegaConf.create({"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "generations_sample": 1}})
    (logger,) = make_loggers(logger_cfg, tmp_path, tmp_path / "01_sft", "01_sft")
    assert isinstance(logger, CSVLogger) and logger.kdpipe_generations_sample == 1
    generations = tmp_path / "generations.jsonl"
    generations.write_text('{"id": "a", "score": 1.0}\n{"id": "b", "score": 0.0}\n')
    log_results([logger], {"accuracy": 1.0}, step=0, evaluation={"accuracy": 1.0}, generations=generations)
    logger.finalize("success")
    sample = (tmp_path / "01_sft" / "logs" / "csv" / "generations_sample.jsonl").read_text()
    assert sample == '{"id": "a", "score": "1.0"}\n'
    assert "eval/accuracy" in (tmp_path / "01_sft" / "logs" / "csv" / "metrics.csv").read_text()


@pytest.fixture
def hydra_job(tmp_path):
    """Set HydraConfig as Hydra sets it for a job (``mode``: that of the run); unset afterwards."""

    def set_job(mode: RunMode, overrides: list[str], num: int) -> None:
        cfg = compose_cfg(overrides, tmp_path, hydra=True)
        with open_dict(cfg):
            cfg.hydra.mode, cfg.hydra.job.num = mode, num
            cfg.hydra.overrides.task = overrides
        HydraConfig.instance().set_config(cfg)

    yield set_job
    HydraConfig.instance().cfg = None


def test_a_multirun_job_records_its_overrides_and_number(hydra_job):
    assert sweep_job() == {}  # no HydraConfig: train(cfg) from a notebook or a test
    hydra_job(RunMode.RUN, ["seed=3"], 0)
    assert sweep_job() == {}  # a single run
    hydra_job(RunMode.MULTIRUN, ["seed=3", "pipeline/preset=alternation"], 1)
    assert sweep_job() == {"sweep": {"overrides": ["seed=3", "pipeline/preset=alternation"], "job_num": 1}}
