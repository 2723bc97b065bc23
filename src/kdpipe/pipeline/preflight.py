"""The preflight: everything a run will need, checked before stage 0, refused in one message listing every
problem. Data splits the stages read parse and validate, and a stage that trains on or scores labels finds no
prompt-only record in them; numeric settings are in range; every rollout set a stage reads is named without
ambiguity (``rollouts_from``, ``data_from``, ``onpolicy_from``) and sampled earlier in the order; every store a
stage reads exists and is intact, or an earlier stage of the order produces it; every output root is
writable; on a resume, the stores and rollout sets of finished stages are intact (shard checksums:
``store_verify``)."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdpipe.data.rollouts import task_answer
from kdpipe.data.sources import load_split
from kdpipe.errors import PipelineConfigError
from kdpipe.models.factory import build_tokenizer
from kdpipe.pipeline.preflight_engines import check_engines
from kdpipe.pipeline.preflight_stores import check_finished, check_stores, label_slot
from kdpipe.pipeline.result import Slot
from kdpipe.pipeline.spec import StageSpec, rollout_stage, score_slots, stage_data, stage_styles
from kdpipe.store.writer import MANIFEST
from kdpipe.utils.dist import is_rank_zero, rank_zero_console
from kdpipe.utils.io import read_json

console = rank_zero_console()
VERIFY = ("full", "size")

# (key, test, what it must be) per stage kind; a missing key is not checked (older saved configs)
_POSITIVE = (lambda v: v is not None and int(v) >= 1, "an integer >= 1")
_OPTIONAL_POSITIVE = (lambda v: v is None or int(v) >= 1, "null or an integer >= 1")
_TRAINING = {
    "max_steps": _POSITIVE,
    "batch_size": _POSITIVE,
    "accumulate_grad_batches": _POSITIVE,
    "val_every_n_steps": _POSITIVE,
    "checkpoint_every_n_steps": _POSITIVE,
    "train_fraction": (lambda v: 0.0 < float(v) <= 1.0, "in (0, 1]"),
}
_EVAL = {"eval.batch_size": _POSITIVE, "eval.max_new_tokens": _POSITIVE, "eval.limit": _OPTIONAL_POSITIVE}
RANGES: dict[str, dict[str, tuple[Callable, str]]] = {
    "sft": {**_TRAINING, **_EVAL},
    "kd": {
        **_TRAINING,
        **_EVAL,
        "onpolicy_lambda": (lambda v: 0.0 <= float(v) <= 1.0, "in [0, 1]"),
        "teacher_k": _OPTIONAL_POSITIVE,
        "teacher_temperature": (lambda v: v is None or float(v) > 0, "> 0 or null"),
    },
    "eval": _EVAL,
    "score": {
        "k": _POSITIVE,
        "temperature": (lambda v: float(v) > 0, "> 0"),
        "batch_size": _POSITIVE,
        "shard_size": _POSITIVE,
        "chunk_size": _POSITIVE,
    },
    "rollout": {
        "n_samples": _POSITIVE,
        "temperature": (lambda v: float(v) >= 0, ">= 0 (0: greedy)"),
        "top_p": (lambda v: 0.0 < float(v) <= 1.0, "in (0, 1]"),
        "max_new_tokens": _POSITIVE,
        "batch_size": _POSITIVE,
        "part_size": _POSITIVE,
        "limit": _OPTIONAL_POSITIVE,
        "exclude_fraction": (lambda v: v is None or 0.0 <= float(v) < 1.0, "null or in [0, 1)"),
    },
}


def _select(settings: DictConfig, dotted: str):
    node = settings
    for part in dotted.split("."):
        if node is None or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_ranges(spec: StageSpec) -> list[str]:
    """Numeric settings of one stage that are out of range (``max_steps=0``, ``top_p=2``, ...)."""
    problems = []
    for key, (ok, what) in RANGES.get(spec.kind, {}).items():
        value = _select(spec.config, key)
        if value is _MISSING:
            continue
        try:
            good = ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            problems.append(f"pipeline.stages.{spec.name}.{key}={value}: must be {what}")
    return problems


def splits_read(specs: Sequence[StageSpec], labelled: bool = False) -> dict[str, list[str]]:
    """Each data split the stages read, with the stages that read it; ``labelled``: only the reads that need
    labels (training and scoring on them: prompt-only records refused), not rollouts' and evaluations'."""
    reads: dict[str, list[str]] = {}

    def add(split, name):
        reads.setdefault(str(split), []).append(name)

    for spec in specs:
        settings = spec.config
        if spec.kind in ("sft", "kd"):
            if settings.get("data_from") is None:  # else it trains on a rollout set
                add("train", spec.name)
            add("val", spec.name)
        if spec.kind == "score" and str(settings.get("sequences", "labels")) == "labels":
            add(settings.get("split", "train"), spec.name)
        if labelled:
            continue
        if spec.kind == "rollout":
            add(settings.get("split", "train"), spec.name)
        if spec.kind in ("sft", "kd", "eval") and settings.get("eval") and settings.eval.get("enabled", True):
            add(settings.eval.get("split", "test"), spec.name)
    return {split: list(dict.fromkeys(readers)) for split, readers in reads.items()}


def check_data(cfg: DictConfig, specs: Sequence[StageSpec]) -> list[str]:
    """Every split a stage reads loads and validates (a bad record is named by ``file:line``); a split that a
    stage trains on or scores holds no prompt-only record; a rollout that keeps only correct responses can
    check each of its prompts."""
    problems = []
    by_data: dict[str, list[StageSpec]] = {}  # stages with a `data` of their own read their own splits
    for spec in specs:
        own = spec.config.get("data") or {}
        key = json.dumps(OmegaConf.to_container(own) if OmegaConf.is_config(own) else own, sort_keys=True)
        by_data.setdefault(key, []).append(spec)
    for readers in by_data.values():
        problems.extend(_check_data(stage_data(cfg, readers[0].config), readers))
    return problems


def _check_data(data: DictConfig, specs: Sequence[StageSpec]) -> list[str]:
    problems = []
    labelled = splits_read(specs, labelled=True)
    for split, readers in splits_read(specs).items():
        try:
            loaded = load_split(data, split)
        except (ValueError, KeyError, FileNotFoundError, ImportError, OSError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            problems.append(f"data split {split!r} (read by {', '.join(readers)}): {message}")
            continue
        if not loaded.examples:
            problems.append(f"data split {split!r} (read by {', '.join(readers)}) has no valid examples")
        if loaded.unlabelled and split in labelled:
            problems.append(
                f"data split {split!r} (read by {', '.join(labelled[split])}) has {len(loaded.unlabelled)} "
                f"prompt-only record(s) with no response to train on or score, the first at "
                f"{loaded.unlabelled[0][1]}: only `rollout` stages read prompt-only records (a training stage "
                "trains on a rollout stage's responses with data_from)"
            )
        problems.extend(_unchecked_prompts(specs, split, loaded))
    return problems


def _unchecked_prompts(specs: Sequence[StageSpec], split: str, loaded) -> list[str]:
    """Rollout stages that keep only correct responses (``filters.only_correct``) over prompts they cannot
    check: prompt-only records without an ``answer`` (``withhold_labels`` is checked by :func:`check_rollouts`)."""
    answerless = {e["id"] for e in loaded.examples if e.get("unlabelled") and e.get("answer") is None}
    first = next((where for id_, where in loaded.unlabelled if id_ in answerless), None)
    problems = []
    for spec in specs:
        settings = spec.config
        if spec.kind != "rollout" or str(settings.get("split", "train")) != split or first is None:
            continue
        if (settings.get("filters") or {}).get("only_correct") and not settings.get("withhold_labels"):
            problems.append(
                f"stage {spec.name!r} keeps only correct responses (filters.only_correct), but {len(answerless)} "
                f"prompt-only record(s) of data split {split!r} have no `answer` to check them with, the first at "
                f"{first}: give them an `answer`, or set pipeline.stages.{spec.name}.filters.only_correct=false"
            )
    return problems


def check_rollouts(cfg: DictConfig, specs: Sequence[StageSpec]) -> list[str]:
    """Every rollout set a stage reads is named without ambiguity and sampled before it (:func:`rollout_stage`):
    a score stage's ``rollouts_from``, a training stage's ``data_from`` and a kd stage's ``onpolicy_from``; a
    rollout that withholds the labels keeps only correct responses only where the task can check them."""
    problems = []
    for index, spec in enumerate(specs):
        settings = spec.config
        styles = stage_styles(settings)
        try:
            if spec.kind == "score":
                score_slots(specs, index)
            if spec.kind in ("sft", "kd") and settings.get("data_from") is not None:
                if len(styles) != 1:
                    raise PipelineConfigError(
                        f"pipeline.stages.{spec.name}.data_from={settings.data_from!r}: a rollout set covers one "
                        f"style; the stage trains on {styles}"
                    )
                rollout_stage(specs, index, styles[0], settings.data_from, "data_from")
            if spec.kind == "kd" and float(settings.get("onpolicy_lambda", 0.0) or 0.0) > 0 and len(styles) == 1:
                rollout_stage(specs, index, styles[0], settings.get("onpolicy_from"), "onpolicy_from")
        except PipelineConfigError as err:
            problems.append(str(err))
        only_correct = (settings.get("filters") or {}).get("only_correct")
        data = stage_data(cfg, settings)
        if spec.kind == "rollout" and settings.get("withhold_labels") and only_correct and not task_answer(data):
            problems.append(
                f"stage {spec.name!r} withholds the labels (withhold_labels) and keeps only correct responses "
                f"(filters.only_correct), but data.source={data.get('source')!r} can only check a response "
                "against a record's labels (the built-in task solves its prompts): drop one of the two"
            )
    return problems


def writable(path: Path) -> str | None:
    """None if files can be created under ``path`` (made if missing), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kdpipe-write-test-"):
            pass
    except OSError as err:
        return f"{path} is not writable ({err.strerror or err})"
    return None


def output_roots(cfg: DictConfig, specs: Sequence[StageSpec], run_dir: Path) -> dict[str, Path]:
    """Every folder the run will write below: the run, stores, shared stages, converted models."""
    log_dir = Path(str(cfg.paths.log_dir)).expanduser()
    roots = {"run directory": run_dir.parent if not run_dir.exists() else run_dir}
    for spec in specs:
        if spec.kind == "score" and spec.config.get("store_root"):
            roots[f"pipeline.stages.{spec.name}.store_root"] = Path(str(spec.config.store_root)).expanduser()
    if any(bool(s.config.get("share")) for s in specs):
        roots["shared stages"] = log_dir / "shared"
    if any(str(m.get("source", "")) in ("gguf", "pretrained") for m in (cfg.get("models") or {}).values()):
        roots["converted models"] = log_dir / "converted"
    return roots


def check_k(cfg: DictConfig, specs: Sequence[StageSpec]) -> list[str]:
    """A score stage's ``k`` fits its teacher's vocabulary (the tokenizer, built as the stage will build it)."""
    problems, sizes = [], {}
    cache_root = Path(str(cfg.paths.log_dir)).expanduser() / "converted"
    for spec in specs:
        if spec.kind != "score" or spec.model not in (cfg.get("models") or {}):
            continue
        try:
            k = int(spec.config.get("k", 1))
            if spec.model not in sizes:
                sizes[spec.model] = len(build_tokenizer(cfg.models[spec.model], cache_root))
        except (ValueError, TypeError, OSError):
            continue  # the range check or the model check names it
        if k > sizes[spec.model]:
            problems.append(
                f"pipeline.stages.{spec.name}.k={k}: more than models.{spec.model}'s vocabulary of {sizes[spec.model]}"
            )
    return problems


def check_teacher_k(specs: Sequence[StageSpec]) -> list[str]:
    """A kd stage's ``teacher_k`` is at most the k of the store it reads: the store given, or the one the latest
    score stage before it writes for its style."""
    problems = []
    for index, spec in enumerate(specs):
        want = spec.config.get("teacher_k") if spec.kind == "kd" else None
        if want is None:
            continue
        store = spec.config.get("store", "auto")
        if str(store) != "auto":
            try:
                k, source = int(read_json(Path(str(store)) / MANIFEST)["k"]), f"store {store}"
            except (OSError, ValueError, KeyError, TypeError):
                continue  # the store check names a missing or damaged store
        else:
            slot = label_slot(specs, index)
            scorers = [s for s in specs[:index] if s.kind == "score" and slot in _slots_of(specs, s.index)]
            if slot is None or not scorers:
                continue
            k, source = int(scorers[-1].config.get("k", 1)), f"stage {scorers[-1].name!r}"
        if int(want) > k:
            problems.append(
                f"pipeline.stages.{spec.name}.teacher_k={want}: more than the k={k} its store holds ({source}); "
                f"a store read at k' <= k needs no new capture"
            )
    return problems


def _slots_of(specs: Sequence[StageSpec], index: int) -> list[Slot]:
    try:
        return score_slots(specs, index)
    except PipelineConfigError:
        return []


def check_exports(finished) -> list[str]:
    """On a resume: the export each finished training stage left (what later stages start from) is there."""
    problems = []
    for record in finished.stages:
        export = record.result.export if record.status == "done" and record.result is not None else None
        if export is not None and not (Path(export) / "config.json").exists():
            problems.append(
                f"stage {record.name!r} is done but its export {export} is missing or incomplete: start a new run, "
                "or restore the export"
            )
    return problems


def preflight(cfg: DictConfig, specs: Sequence[StageSpec], run_dir: Path, finished=None) -> None:
    """Check everything the run will need; raise one :class:`PipelineConfigError` listing every problem.
    ``finished``: the :class:`~kdpipe.pipeline.state.PipelineState` of the run being resumed."""
    started = time.perf_counter()
    verify = str(cfg.get("store_verify") or "full")
    problems: list[str] = []
    if verify not in VERIFY:
        problems.append(f"store_verify={verify}: choose one of {list(VERIFY)}")
        verify = "full"
    for spec in specs:
        problems.extend(check_ranges(spec))
    problems.extend(check_k(cfg, specs))
    problems.extend(check_teacher_k(specs))
    problems.extend(check_data(cfg, specs))
    problems.extend(check_rollouts(cfg, specs))
    problems.extend(check_engines(cfg, specs))
    done_stores = finished.stores if finished is not None else {}
    done_rollouts = finished.rollouts if finished is not None else {}
    problems.extend(check_stores(specs, done_stores, verify))
    problems.extend(check_finished(done_stores, done_rollouts, verify))
    if finished is not None:
        problems.extend(check_exports(finished))
    roots = output_roots(cfg, specs, run_dir).items() if is_rank_zero() else ()  # rank 0 writes; the others read
    for what, root in roots:
        problem = writable(root)
        if problem:
            problems.append(f"{what}: {problem}")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        error = PipelineConfigError(f"the run cannot start ({count}):\n{listed}")
        if all(p.startswith("data split") for p in problems):
            error.kind = "data"  # `kdpipe-train: data error: ...`
        raise error
    seconds = time.perf_counter() - started
    if done_stores:
        console.print(f"[dim]preflight: {len(done_stores)} finished stores verified ({verify}) in {seconds:.1f}s")
