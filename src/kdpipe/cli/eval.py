"""``kdpipe-eval``: evaluate an HF model directory (e.g. a stage's ``export/``), or score replies made anywhere.

kdpipe-eval model_path=logs/runs/<run>/03_sft_fast/export        # the run's data, style and metric
kdpipe-eval model_path=... split=val limit=100
kdpipe-eval model_path=... data=jsonl_chat data.files.test=other.jsonl   # other data: its own output file
kdpipe-eval predictions=replies.jsonl data=jsonl_chat data.files.test=test.jsonl   # {id, response} per line
kdpipe-eval model_path=... device=npu          # on an Ascend NPU (torch_npu + CANN; docs/ascend.md)

A stage export remembers its run: without ``data=``, the data, style and metric are those the stage was
evaluated with. Anything else (a model from elsewhere, predictions) needs ``data=`` named.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from kdpipe import errors
from kdpipe.accelerators import register as register_accelerators
from kdpipe.accelerators import resolve_device
from kdpipe.cli.errors import exit_on_user_error, run_hydra_command
from kdpipe.cli.overrides import check_overrides
from kdpipe.data.records import RecordSpec
from kdpipe.eval import evaluate_model, score_predictions
from kdpipe.eval.plan import EvalPlan, MetricNotApplicable, plan_evaluation
from kdpipe.models.factory import load_model, load_tokenizer
from kdpipe.pipeline.checks import eval_style
from kdpipe.utils.io import atomic_write_json, atomic_write_text, read_json
from kdpipe.utils.paths import config_dir
from kdpipe.utils.quiet import quiet_third_party

console = Console()


class EvalInputError(errors.KdpipeError, ValueError):
    """Bad ``kdpipe-eval`` input: the message names the key to give or fix."""

    kind = "config"


class PredictionsError(errors.DataError):
    """A predictions file that cannot be scored: the message names the file and line."""


# kdpipe-eval's own user errors beside the common ones (kdpipe.cli.errors): a key the data config lacks, a
# metric that does not apply to the data
EVAL_ERRORS = ((KeyError, "config"), (MetricNotApplicable, "config"))


@dataclass
class RunDefaults:
    """What the run that wrote an export evaluated with: its data config and the stage's eval settings."""

    run_dir: Path
    stage: str
    data: DictConfig
    eval: DictConfig
    style: str


def run_defaults(model_path: Path) -> RunDefaults | None:
    """The defaults of ``<run>/<NN_stage>/export``: the run's ``config.yaml`` data, the stage's evaluation."""
    stage_dir, run_dir = model_path.parent, model_path.parent.parent
    metrics_file, config_file = stage_dir / "metrics.json", run_dir / "config.yaml"
    if model_path.name != "export" or not metrics_file.exists() or not config_file.exists():
        return None
    settings = OmegaConf.create(read_json(metrics_file).get("settings") or {})
    if "eval" not in settings:
        settings.eval = {}
    return RunDefaults(
        run_dir=run_dir,
        stage=stage_dir.name,
        data=OmegaConf.load(config_file).data,
        eval=settings.eval,
        style=eval_style(settings),
    )


def first_style(data_cfg: DictConfig) -> str:
    """The style to evaluate in when nothing says: the data's first (``data.styles``, else ``system_prompts``)."""
    return RecordSpec.from_config(data_cfg, default_prefix="data").styles[0]


def read_predictions(path: Path) -> dict[str, str]:
    """``{id: response}`` from a JSONL file; a bad line is refused naming ``file:line`` (``:column``)."""
    if not path.is_file():
        raise PredictionsError(f"predictions: no such file {path}")
    found: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PredictionsError(f"{path}:{number}:{err.colno}: invalid JSON: {err.msg}") from err
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("response"), str):
            raise PredictionsError(f'{path}:{number}: expected {{"id": ..., "response": "..."}}')
        key = str(record["id"])
        if key in found:
            raise PredictionsError(f"{path}:{number}: id {key!r} appears twice")
        found[key] = record["response"]
    if not found:
        raise PredictionsError(f"{path}: no predictions")
    return found


def choose(cfg: DictConfig) -> tuple[DictConfig, DictConfig, str, RunDefaults | None]:
    """The data, the eval settings and the style to use: the command's keys over the export run's."""
    model_path = Path(str(cfg.model_path)).expanduser() if cfg.get("model_path") else None
    defaults = run_defaults(model_path) if model_path is not None else None
    data = cfg.get("data")
    if data is None:
        if defaults is None:
            what = f"{model_path} is not a stage export of a kdpipe run" if model_path else "predictions= given"
            raise EvalInputError(
                f"{what}: name the data to score on, e.g. data=arith, or data=jsonl_chat data.files.test=test.jsonl"
            )
        data = defaults.data
    base = defaults.eval if defaults is not None and cfg.get("data") is None else OmegaConf.create({})
    eval_cfg = OmegaConf.create(
        {
            "split": cfg.split,
            "limit": cfg.get("limit"),
            "metric": cfg.metric if cfg.get("metric") is not None else base.get("metric", "auto"),
            "extractor": cfg.extractor if cfg.get("extractor") is not None else base.get("extractor"),
            "pattern": cfg.pattern if cfg.get("pattern") is not None else base.get("pattern"),
        }
    )
    style = cfg.get("style") or (defaults.style if defaults and cfg.get("data") is None else first_style(data))
    return data, eval_cfg, str(style), defaults


def output_path(cfg: DictConfig, plan: EvalPlan, defaults: RunDefaults | None) -> Path:
    """``output``, else beside the export (``eval_<split>.json``; other data than the run's: its own name) or
    the predictions file (``<name>.eval_<split>.json``)."""
    if cfg.get("output"):
        return Path(str(cfg.output)).expanduser()
    if cfg.get("predictions"):
        predictions = Path(str(cfg.predictions)).expanduser()
        return predictions.with_name(f"{predictions.stem}.eval_{plan.split}.json")
    stage_dir = Path(str(cfg.model_path)).expanduser().parent
    if defaults is not None and cfg.get("data") is None:
        return stage_dir / f"eval_{plan.split}.json"
    return stage_dir / f"eval_{plan.split}-{plan.data['source']}-{plan.data['fingerprint'][:8]}.json"


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()})
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.model_path`` (or score ``cfg.predictions``); write and return the output JSON."""
    if not cfg.get("model_path") and not cfg.get("predictions"):
        raise EvalInputError("give model_path=<HF model dir> (e.g. <run>/<stage>/export) or predictions=<file.jsonl>")
    if cfg.get("model_path") and not Path(str(cfg.model_path)).expanduser().is_dir():
        raise FileNotFoundError(f"model_path {cfg.model_path} is not a directory (expected an HF export)")
    # before anything else: a missing torch_npu fails fast and says why
    device = None if cfg.get("predictions") else resolve_device(str(cfg.device))
    data, eval_cfg, style, defaults = choose(cfg)
    plan = plan_evaluation(data, eval_cfg, style)
    if plan.note:
        console.print(f"[yellow]{plan.note}")
    payload: dict = {"split": plan.split, "style": style, "metric": plan.metric.name, "data": plan.data}
    if cfg.get("predictions"):
        replies = read_predictions(Path(str(cfg.predictions)).expanduser())
        known = {str(e["id"]) for e in plan.examples}
        unknown = sorted(set(replies) - known)
        if unknown:
            raise PredictionsError(
                f"predictions {cfg.predictions}: {len(unknown)} ids are not in {plan.data['described']} "
                f"(e.g. {unknown[:3]}); check the split and data"
            )
        examples = [e for e in plan.examples if str(e["id"]) in replies]
        metrics, records = score_predictions(plan.metric, examples, [replies[str(e["id"])] for e in examples])
        metrics["missing_predictions"] = len(plan.examples) - len(examples)
        payload["predictions"] = str(cfg.predictions)
    else:
        path = Path(str(cfg.model_path)).expanduser()
        trust = bool(cfg.get("trust_remote_code", False))
        model, tokenizer = load_model(path, trust_remote_code=trust), load_tokenizer(path, trust)
        model.to(device)
        metrics, records = evaluate_model(
            model,
            tokenizer,
            plan.examples,
            metric=plan.metric,
            style=style,
            system_prompt=plan.system_prompt,
            batch_size=int(cfg.batch_size),
            max_new_tokens=int(cfg.max_new_tokens),
        )
        payload["model_path"] = str(path)
        if defaults is not None:
            payload["run"] = {"dir": str(defaults.run_dir), "stage": defaults.stage}
    payload["metrics"] = metrics
    output = output_path(cfg, plan, defaults)
    atomic_write_json(output, payload)
    if cfg.get("save_generations", True) and records:
        atomic_write_text(output.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    table = Table(title=f"kdpipe-eval: {plan.metric.name} on {plan.data['described']} ({style})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, format_value(value))
    console.print(table)
    console.print(f"metrics written to {output}")
    return payload


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def hydra_main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    register_accelerators()
    with exit_on_user_error("kdpipe-eval", EVAL_ERRORS):
        accuracy = evaluate(cfg)["metrics"].get("accuracy")
    return None if accuracy is None else float(accuracy)


def main() -> None:
    """``kdpipe-eval``: the command line's keys checked, then Hydra's entry point; user errors in one line."""
    run_hydra_command("kdpipe-eval", hydra_main, check=lambda: check_overrides(sys.argv[1:], "eval"))


if __name__ == "__main__":
    main()
