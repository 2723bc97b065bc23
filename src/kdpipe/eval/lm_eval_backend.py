"""lm-evaluation-harness as an optional evaluation backend (``eval.backend=lm_eval``).

:func:`run_lm_eval` evaluates a local Hugging Face export (model + tokenizer in one folder) on lm-eval tasks
(built-in ones, or your own task YAMLs under ``include_path``) through lm-eval's Python API, and returns flat
metrics ``lm_eval/<task>/<metric>`` (``lm_eval/<task>/<metric>/<filter>`` for a filter other than ``none``,
``..._stderr`` beside each). lm-eval is imported only here, when called: ``pip install 'kdpipe[eval]'``.

By default nothing is downloaded: the Hub and ``datasets`` are offline for the call, so tasks read local files
(``dataset_path: json`` + ``data_files``) or datasets already in the Hugging Face cache.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from contextlib import contextmanager
from pathlib import Path

from kdpipe.utils.io import atomic_write_json

MISSING = "eval.backend=lm_eval needs lm-evaluation-harness: pip install 'kdpipe[eval]'"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def run_lm_eval(
    model_dir: str | Path,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    include_defaults: bool | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str = "cpu",
    apply_chat_template: bool = True,
    max_new_tokens: int | None = None,
    num_fewshot: int | None = None,
    trust_remote_code: bool = False,
    model_args: dict | None = None,
    offline: bool = True,
    output_dir: str | Path | None = None,
) -> dict[str, float]:
    """Run lm-eval's ``tasks`` on the export in ``model_dir`` and return its metrics, flat.

    ``include_path``: a folder of your own task YAMLs. ``include_defaults``: whether lm-eval's ~15k built-in
    tasks are indexed too (~15 s); None: only when ``tasks`` are not all under ``include_path``. ``limit``:
    documents per task (a float < 1: a fraction). ``max_new_tokens`` overrides the tasks' ``max_gen_toks``.
    ``model_args`` adds to lm-eval's ``hf`` model arguments (e.g. ``{"dtype": "bfloat16"}``). ``offline=False``
    lets lm-eval download the Hub datasets of built-in tasks. ``output_dir``: lm-eval's results
    (``lm_eval_results.json``) and per-document samples (``lm_eval_samples.json``) are written there."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "lm_eval":
            raise ImportError(MISSING) from err
        raise

    args = {"pretrained": str(model_dir), "trust_remote_code": trust_remote_code, **(model_args or {})}
    path = None if include_path is None else str(include_path)
    with _hf_offline(offline):
        local = TaskManager(include_path=path, include_defaults=False) if path and include_defaults is None else None
        if local is not None and set(tasks) <= set(local.all_tasks):
            task_manager = local  # only your own tasks: the built-in ones are not indexed
        else:
            task_manager = TaskManager(include_path=path, include_defaults=include_defaults is not False)
        results = simple_evaluate(
            model="hf",
            model_args=args,
            tasks=list(tasks),
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template,  # few-shot examples as chat turns only with a template
            gen_kwargs=None if max_new_tokens is None else {"max_gen_toks": max_new_tokens},
            log_samples=output_dir is not None,
        )
    if results is None:  # ranks other than 0 of a distributed run get nothing back
        return {}
    if output_dir is not None:
        plain = json.loads(json.dumps(results, default=str))  # dtypes, numpy values: as strings
        atomic_write_json(Path(output_dir) / "lm_eval_samples.json", plain.pop("samples", {}))
        atomic_write_json(Path(output_dir) / "lm_eval_results.json", plain)
    return _flat_metrics(results["results"])


def _flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """lm-eval's ``results`` (``{task: {"exact_match,none": 0.5, "exact_match_stderr,none": 0.1, "alias": ..}}``)
    as ``{"lm_eval/task/exact_match": 0.5, "lm_eval/task/exact_match_stderr": 0.1}``: finite numbers only."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue  # alias, name, sample_len; "N/A" stderrs
            if math.isfinite(value):
                flat[f"lm_eval/{task}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")] = float(value)
    return flat


@contextmanager
def _hf_offline(enabled: bool = True):
    """The Hub and ``datasets`` offline inside the block: the environment variables for what reads them later,
    and the flags ``huggingface_hub`` and ``datasets`` already read when they were imported."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]  # fmt: skip
    saved_flags = [(module, name, getattr(module, name)) for module, name in flags if hasattr(module, name)]
    saved_env = {name: os.environ.get(name) for name in OFFLINE_ENV}
    try:
        os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))
        for module, name, _ in saved_flags:
            setattr(module, name, True)
        yield
    finally:
        for module, name, value in saved_flags:
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
