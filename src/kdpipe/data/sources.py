"""Where examples come from. Every source yields the same example dicts (see :mod:`kdpipe.data.arith`).

Sources are named by ``data.source``:

- ``arith``: the built-in task, generated from a seed;
- ``jsonl`` / ``parquet``: one file per split, ``data.files.<split>``;
- ``hf_disk``: ``datasets.load_from_disk``, either ``data.path`` (a saved ``DatasetDict``, its split for each
  kdpipe split in ``data.splits``) or one saved dataset per split in ``data.files``;
- ``hf_hub``: ``datasets.load_dataset(data.path, data.name, split=data.splits.<split>, **data.load_kwargs)``
  (a hub dataset, or a packaged builder such as ``json`` with ``load_kwargs.data_files``).

Records of the file and dataset sources are validated and turned into examples by :mod:`kdpipe.data.records`
(``data.fields``, ``data.styles``, ``data.on_error``, ...). Parsed splits are cached per process, keyed by the
config and the files' size and modification time, so the stages of one run read each file once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdpipe.data import arith
from kdpipe.data.records import ParsedRecords, Problem, RecordError, RecordSpec, check_parsed, parse_records

CACHE_SIZE = 16


@dataclass(frozen=True)
class LoadedSplit:
    """One split's examples and the invalid records dropped from it (``data.on_error=skip``): each a
    :class:`~kdpipe.data.records.Problem` (where it is, what is wrong); ``unlabelled``: ``(id, where)`` of each
    prompt-only record (a prompt and no response: input for rollout stages only)."""

    examples: list[dict]
    problems: tuple[Problem, ...] = ()
    unlabelled: tuple[tuple[str, str], ...] = ()

    @property
    def skipped_invalid(self) -> int:
        """How many invalid records were dropped."""
        return len(self.problems)


@lru_cache(maxsize=16)
def _arith_split(split: str, n_per_level: int, seed: int, levels: tuple[int, ...], max_value: int, **task) -> tuple:
    return tuple(arith.generate_split(split, n_per_level, seed=seed, levels=list(levels), max_value=max_value, **task))


def load_arith(cfg: DictConfig, split: str) -> LoadedSplit:
    """The built-in arithmetic task; sizes per level come from ``cfg.n_<split>_per_level``."""
    key = f"n_{split}_per_level"
    if key not in cfg:
        raise KeyError(f"data config has no {key!r}")
    noise = cfg.get("label_noise") or {}
    task = {
        "version": int(cfg.get("version", 1)),
        "noise_rate": float(noise.get("rate", 0.0)),
        "noise_kind": str(noise.get("kind", "slip")),
        "noise_seed": int(noise.get("seed", 0)),
    }
    examples = _arith_split(split, int(cfg[key]), int(cfg.seed), tuple(cfg.levels), int(cfg.max_value), **task)
    return LoadedSplit(list(examples))


def split_file(cfg: DictConfig, split: str) -> Path:
    """The path in ``data.files.<split>``; names the key and the path when it is missing."""
    files = cfg.get("files") or {}
    if split not in files or files[split] is None:
        raise KeyError(f"data.files has no {split!r} entry (it has {sorted(files)})")
    path = Path(str(files[split])).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data.files.{split}: no such file or directory {str(files[split])!r} ({path.resolve()})"
        )
    return path


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(path:line, record)`` for each non-blank line (1-based); a line that is not JSON yields a RecordError
    at ``path:line:column`` (the column of the line as written, 1-based, its line break left out)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield where, RecordError(f"not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, RecordError(f"invalid JSON: {err.msg}", column=err.colno)


def parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(path row i, record)`` for each row (0-based) of a parquet file."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("data.source=parquet needs pyarrow: pip install 'kdpipe[real]'") from err
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path} row {i}", row


def dataset_rows(dataset, where: str) -> Iterator[tuple[str, Any]]:
    """``(where row i, record)`` for each row (0-based) of a ``datasets`` dataset."""
    for i, row in enumerate(dataset):
        yield f"{where} row {i}", row


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data.source=hf_disk / hf_hub needs datasets: pip install 'kdpipe[real]'") from err
    return datasets


def split_name(cfg: DictConfig, split: str) -> str:
    """The dataset's name for a kdpipe split (``data.splits.<split>``, default the same name)."""
    return str((cfg.get("splits") or {}).get(split) or split)


def pick_split(dataset, name: str, where: str):
    """A ``Dataset`` as it is; the ``name`` split of a ``DatasetDict``."""
    if not hasattr(dataset, "keys"):
        return dataset
    if name not in dataset:
        raise KeyError(f"{where} has no split {name!r} (it has {sorted(dataset.keys())}); set data.splits")
    return dataset[name]


def hf_disk_rows(cfg: DictConfig, split: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    """What is read and its rows, from ``datasets.load_from_disk``."""
    datasets, name = _datasets(), split_name(cfg, split)
    if cfg.get("files"):
        path = split_file(cfg, split)
        dataset = pick_split(datasets.load_from_disk(str(path)), name, f"data.files.{split} ({path})")
        return f"data.files.{split} ({path})", dataset_rows(dataset, str(path))
    if not cfg.get("path"):
        raise KeyError("data.source=hf_disk needs data.path (a saved DatasetDict) or data.files.<split>")
    path = Path(str(cfg.path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.path: no such directory {str(cfg.path)!r} ({path.resolve()})")
    loaded = datasets.load_from_disk(str(path))
    if not hasattr(loaded, "keys"):
        raise ValueError(
            f"data.path {path} is a single Dataset: save a DatasetDict, or give one per split in data.files"
        )
    return f"data.path {path} split {name!r}", dataset_rows(
        pick_split(loaded, name, f"data.path {path}"), f"{path}[{name}]"
    )


def hf_hub_rows(cfg: DictConfig, split: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    """What is read and its rows, from ``datasets.load_dataset``."""
    if not cfg.get("path"):
        raise KeyError("data.source=hf_hub needs data.path (a hub dataset name or a builder such as 'json')")
    kwargs = OmegaConf.to_container(cfg.load_kwargs, resolve=True) if cfg.get("load_kwargs") else {}
    name = split_name(cfg, split)
    dataset = _datasets().load_dataset(str(cfg.path), cfg.get("name"), split=name, **kwargs)
    return f"dataset {cfg.path} split {name!r}", dataset_rows(dataset, f"{cfg.path}[{name}]")


def _file_rows(reader: Callable[[Path], Iterator[tuple[str, Any]]]):
    def rows(cfg: DictConfig, split: str) -> tuple[str, Iterator[tuple[str, Any]]]:
        path = split_file(cfg, split)
        return f"data.files.{split} ({path})", reader(path)

    return rows


ROW_READERS: dict[str, Callable[[DictConfig, str], tuple[str, Iterator[tuple[str, Any]]]]] = {
    "jsonl": _file_rows(jsonl_rows),
    "parquet": _file_rows(parquet_rows),
    "hf_disk": hf_disk_rows,
    "hf_hub": hf_hub_rows,
}


def _stat_key(value: Any) -> list:
    """Size and modification time of a local file, or of every file under a directory (empty otherwise)."""
    path = Path(str(value)).expanduser()
    if path.is_file():
        return [str(path), path.stat().st_size, path.stat().st_mtime_ns]
    if path.is_dir():
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.rglob("*")) if p.is_file()]
    return []


def _cache_key(cfg: DictConfig, split: str) -> str:
    """The config (resolved) and the state of every local path it names, as one string."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    local = [_stat_key(v) for v in [*(plain.get("files") or {}).values(), plain.get("path")] if v is not None]
    return hashlib.sha256(json.dumps([split, plain, local], sort_keys=True, default=str).encode()).hexdigest()


_PARSED: dict[str, ParsedRecords] = {}


def load_records(cfg: DictConfig, split: str) -> LoadedSplit:
    """A split of a file or dataset source, validated under ``data.on_error`` (cached per process)."""
    key = _cache_key(cfg, split)
    if key not in _PARSED:
        spec = RecordSpec.from_config(cfg, default_prefix=str(cfg.source))
        what, rows = ROW_READERS[str(cfg.source)](cfg, split)
        if len(_PARSED) >= CACHE_SIZE:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = check_parsed(parse_records(rows, spec), spec, what)
    parsed = _PARSED[key]
    return LoadedSplit(parsed.examples, tuple(parsed.problems), tuple(parsed.unlabelled))


SOURCES: dict[str, Callable[[DictConfig, str], LoadedSplit]] = {
    "arith": load_arith,
    **{name: load_records for name in ROW_READERS},
}


def load_split(cfg: DictConfig, split: str) -> LoadedSplit:
    """Load one split of the dataset described by a ``data`` config, with the count of dropped records.
    The example dicts are fresh shallow copies: callers may annotate them."""
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data.source {cfg.source!r}; choose one of {sorted(SOURCES)}")
    loaded = SOURCES[cfg.source](cfg, split)
    return LoadedSplit([dict(e) for e in loaded.examples], loaded.problems, loaded.unlabelled)


def load_examples(cfg: DictConfig, split: str) -> list[dict]:
    """Load one split of the dataset described by a ``data`` config."""
    return load_split(cfg, split).examples


def describe_data(cfg: DictConfig, split: str) -> str:
    """Where a split comes from, in words: ``the built-in task (arith) split 'test'``, ``data.files.test (x.jsonl)``."""
    source = str(cfg.get("source"))
    if source == "arith":
        return f"the built-in task (arith) split {split!r}"
    files = cfg.get("files") or {}
    if files.get(split) is not None:
        return f"data.files.{split} ({files[split]})"
    return f"data.path {cfg.get('path')} split {split_name(cfg, split)!r} (data.source={source})"


def examples_fingerprint(examples: list[dict]) -> str:
    """A short hash of a split's examples (ids and content): two evaluations on equal data share it."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def data_identity(cfg: DictConfig, split: str, examples: list[dict]) -> dict:
    """What an evaluation scored: the source, its files (or path, or the built-in task's seed), the split, the
    number of examples and their fingerprint."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    identity: dict = {"source": plain.get("source"), "split": split, "described": describe_data(cfg, split)}
    if plain.get("source") == "arith":
        identity.update({k: plain.get(k) for k in ("seed", "levels", "max_value", f"n_{split}_per_level")})
    if (plain.get("files") or {}).get(split) is not None:
        identity["file"] = str(Path(str(plain["files"][split])).expanduser().resolve())
    if plain.get("path") is not None:
        identity.update(path=str(plain["path"]), dataset_split=split_name(cfg, split))
    identity.update(num_examples=len(examples), fingerprint=examples_fingerprint(examples))
    return identity


def _id_bucket(example: dict) -> int:
    return int(hashlib.sha1(str(example["id"]).encode()).hexdigest()[:8], 16)


def subset_by_id(examples: list[dict], fraction: float) -> list[dict]:
    """The examples whose id hashes below ``fraction``: about that share, the same for every run, and
    nested (a smaller fraction's subset lies inside a larger one's), so data-scale studies compare like
    with like."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return examples
    threshold = int(fraction * 2**32)
    return [e for e in examples if _id_bucket(e) < threshold]


def outside_subset_by_id(examples: list[dict], fraction: float) -> list[dict]:
    """The examples :func:`subset_by_id` leaves out at ``fraction``: its exact complement (e.g. the prompts a
    teacher labels for a student that later trains on the ``train_fraction`` subset's human labels)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"exclude_fraction must be in [0, 1), got {fraction}")
    threshold = int(fraction * 2**32)
    return [e for e in examples if _id_bucket(e) >= threshold]
