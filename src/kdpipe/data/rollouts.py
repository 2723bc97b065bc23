"""Rollouts: the current student's own responses, sampled offline, as a dataset a teacher can score.

A rollout dataset is a folder::

    part-00000.jsonl   # one record per sampled response, for prompts [0, chunk) of the split
    part-00001.jsonl   # ... each part written atomically: the unit of resume
    manifest.json      # written last: settings, counts, the filters; its presence marks the set complete

A rollout stage with ``withhold_labels`` samples from the prompts alone (:func:`withhold_labels`: no
response, no answer, a chat cut before its reply), so the set holds no trace of the labels; its ``correct``
is then what the task can check without them (:func:`task_answer`: the built-in task solves its prompt).

Each record is an example dict like the source's (``prompt``, ``level``, ``answer``, ``responses``), with
``id = "<prompt id>#s<j>"`` (sample j of that prompt), ``prompt_id``, ``sample``, ``finished`` (ended its
turn) and ``correct`` (the task's check, when it has one). Parts keep every sample; the filters are applied
when the set is loaded, so the manifest's counts say what was dropped and why.

This module is the format; :mod:`kdpipe.engines.rollouts` samples the parts (seeded per part, so a resumed
rollout reproduces the parts an uninterrupted one would write).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdpipe.data import arith
from kdpipe.data.encode import prompt_messages
from kdpipe.utils.io import read_json

MANIFEST = "manifest.json"
ROLLOUT_VERSION = 1


def rollout_id(prompt_id: str, sample: int) -> str:
    """The id of sample ``sample`` of prompt ``prompt_id`` (stable: resumes and stores key on it)."""
    return f"{prompt_id}#s{sample}"


def prompt_id_of(example_id: str) -> str:
    """The prompt an id of :func:`rollout_id` came from."""
    return example_id.rsplit("#s", 1)[0]


@dataclass(frozen=True)
class RolloutSettings:
    """How to sample: responses per prompt, sampling knobs, and how many prompts make one part."""

    style: str
    n_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 128
    part_size: int = 512
    seed: int = 0
    drop_truncated: bool = True
    only_correct: bool = False


def part_path(root: Path, index: int) -> Path:
    return root / f"part-{index:05d}.jsonl"


def read_part(path: Path) -> list[dict]:
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_no}: not a JSON record ({err.msg})") from err
    return records


def apply_filters(records: list[dict], drop_truncated: bool, only_correct: bool) -> list[dict]:
    """Drop responses cut off by the token limit and/or those the task checks as wrong."""
    kept = [r for r in records if r["finished"] or not drop_truncated]
    return [r for r in kept if r["correct"] is not False or not only_correct]


def load_rollouts(root: str | Path) -> list[dict]:
    """The kept records of a complete rollout set (the filters its manifest recorded)."""
    root = Path(root)
    if not (root / MANIFEST).exists():
        raise FileNotFoundError(f"{root} is not a complete rollout set (no {MANIFEST}; was its stage interrupted?)")
    manifest = read_json(root / MANIFEST)
    records = [r for index in range(int(manifest["parts"])) for r in read_part(part_path(root, index))]
    settings = manifest["settings"]
    return apply_filters(records, bool(settings["drop_truncated"]), bool(settings["only_correct"]))


LABEL_FIELDS = ("responses", "answer", "unlabelled")  # what withhold_labels leaves out of a prompt
_EXPRESSION = re.compile(r"\d+(?:[+\-*]\d+)*")


def withhold_labels(prompts: list[dict]) -> list[dict]:
    """The prompts without their labels: responses and answers left out, a chat cut to the turns before its
    (last) reply. Ids and levels stay: they say which prompt it is and how hard, not what the answer is."""
    withheld = []
    for example in prompts:
        kept = {k: v for k, v in example.items() if k not in LABEL_FIELDS}
        if "messages" in kept:
            kept["messages"] = prompt_messages(example)
        withheld.append(kept)
    return withheld


def arith_answer(example: dict) -> str | None:
    """The built-in task's answer, solved from its prompt alone (an expression such as ``7+3*6``)."""
    prompt = str(example.get("prompt") or "").strip()
    if not _EXPRESSION.fullmatch(prompt):
        return None
    tokens = re.findall(r"\d+|[+\-*]", prompt)
    value, _ = arith.solve([int(t) for t in tokens[0::2]], tokens[1::2])
    return str(value)


def task_answer(data_cfg) -> Callable[[dict], str | None] | None:
    """How the task checks a response without the record's labels: the built-in task (``data.source=arith``)
    computes the answer from the prompt; None for every other source (its answers are labels)."""
    if data_cfg is not None and data_cfg.get("source") == "arith":
        return arith_answer
    return None
