"""Turn raw records (JSON lines, parquet rows, dataset rows) into kdpipe example dicts, validating each.

A record is in one of two formats (field names are configurable, see :class:`RecordSpec`):

- **chat**: ``messages``, a list of ``{role, content}`` turns with roles ``system`` (first turn only),
  ``user`` and ``assistant``, ending with an assistant turn. Every assistant turn is learned. The
  conversation is the same for every response style and keeps its own system turns.
- **prompt/response**: ``prompt`` (a string) and ``response``: either one string, used for every style in
  ``data.styles``, or a dict of style variants such as ``{"reasoning": "...", "fast": "..."}`` (the example
  then has exactly the styles it lists). Flat columns map onto the dict through the field map:
  ``fields.response: {reasoning: response_reasoning, fast: response_fast}``.

A record with a prompt and no response is valid too, as input for rollout stages (the model under study
writes the responses): a ``prompt`` without ``response`` (absent or null; every flat response column empty),
or a chat whose last turn is a ``user`` turn. Its example is marked ``"unlabelled": True`` and has no
``responses``; :attr:`ParsedRecords.unlabelled` lists where each one is, so that stages that train on or
score labels can refuse them naming ``file:line`` (:mod:`kdpipe.pipeline.preflight`).

Optional fields: ``id`` (else ``<id_prefix>-<sha1 of the content>[:12]``), ``difficulty`` (a number, becomes
the example's ``level`` for the ``level`` curriculum scorer and per-level metrics) and ``answer`` (checked
by the evaluation's exact match). Ids must be unique within a split.

The result has the shape of the built-in task's examples (:mod:`kdpipe.data.arith`): ``{"id", "prompt",
"responses", "level", "answer"}``, or ``{"id", "messages", "level", "answer"}`` for chat records
(``{"id", "prompt" | "messages", "unlabelled": True, "level", "answer"}`` for a prompt-only record).

Every bad record becomes a :class:`Problem` naming where it is (``file:line`` for JSONL, ``... row i``,
0-based, for tables) and what is wrong. ``on_error=fail`` raises one :class:`DataError` listing the first
problems and their total; ``on_error=skip`` drops the bad records and counts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kdpipe import errors

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ON_ERROR = ("fail", "skip")
DEFAULT_FIELDS = {
    "messages": "messages",
    "prompt": "prompt",
    "response": "response",
    "id": "id",
    "difficulty": "difficulty",
    "answer": "answer",
    "role": "role",
    "content": "content",
}
MAX_LISTED = 10  # problems spelled out in a DataError's message


@dataclass(frozen=True)
class Problem:
    """One bad record: where it is (``file:line`` or ``... row i``), what is wrong with it, and for a syntax
    error the column (1-based) on that line."""

    where: str
    message: str
    column: int | None = None

    @property
    def location(self) -> str:
        """``where``, with ``:column`` when there is one (``file:line:column``, as editors jump to)."""
        return self.where if self.column is None else f"{self.where}:{self.column}"

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"

    def to_json(self, split: str) -> dict:
        """One line of a stage's ``skipped_records.jsonl``: the split, ``file:line`` and the reason."""
        return {"split": split, "where": self.location, "reason": self.message}


class DataError(errors.DataError):
    """Invalid records in a data source: ``problems`` lists them (the message spells out the first few); a
    :class:`kdpipe.errors.DataError`, so a ``ValueError``."""

    def __init__(self, what: str, problems: list[Problem], total: int | None = None) -> None:
        self.problems, self.total = problems, len(problems) if total is None else total
        lines = [f"  {p}" for p in problems[:MAX_LISTED]]
        if self.total > len(lines):
            lines.append(f"  ... and {self.total - len(lines)} more")
        super().__init__("\n".join([what, *lines]))


class RecordError(ValueError):
    """Raised by the record parsers for one bad record; the message says what is wrong (``column``: where on
    its line, for a syntax error)."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class RecordSpec:
    """How to read records: field names, role names, response styles, id prefix and error policy."""

    fields: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    roles: Mapping[str, str] = field(default_factory=dict)
    styles: tuple[str, ...] = ("reasoning",)
    id_prefix: str = "data"
    on_error: str = "fail"

    @classmethod
    def from_config(cls, data_cfg: Mapping, default_prefix: str) -> RecordSpec:
        """The spec of a ``data`` config: ``fields``, ``roles``, ``styles`` (default: the styles of
        ``system_prompts``, else ``[reasoning]``), ``id_prefix`` (default ``default_prefix``), ``on_error``."""
        fields = dict(DEFAULT_FIELDS)
        for key, value in dict(data_cfg.get("fields") or {}).items():
            if key not in DEFAULT_FIELDS:
                raise ValueError(f"data.fields.{key}: unknown field; the fields are {sorted(DEFAULT_FIELDS)}")
            fields[key] = dict(value) if isinstance(value, Mapping) else str(value)
        for key, value in fields.items():
            if isinstance(value, dict) and key != "response":
                raise ValueError(f"data.fields.{key} must be a column name; only `response` may map styles")
        styles = data_cfg.get("styles") or list(data_cfg.get("system_prompts") or {}) or ["reasoning"]
        on_error = str(data_cfg.get("on_error") or "fail")
        if on_error not in ON_ERROR:
            raise ValueError(f"data.on_error={on_error!r}: choose one of {list(ON_ERROR)}")
        return cls(
            fields=fields,
            roles={str(k): str(v) for k, v in dict(data_cfg.get("roles") or {}).items()},
            styles=tuple(str(s) for s in styles),
            id_prefix=str(data_cfg.get("id_prefix") or default_prefix),
            on_error=on_error,
        )


@dataclass
class ParsedRecords:
    """The valid examples of one split, in record order, the bad records (dropped under ``skip``), and
    ``(id, where)`` of each prompt-only record (valid, but only for stages that need no labels)."""

    examples: list[dict]
    problems: list[Problem]
    unlabelled: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.problems)


def _present(value: Any) -> bool:
    """Whether a field holds a value: None and NaN (a table's missing cell) count as absent."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _text(value: Any, what: str) -> str:
    """A non-empty string, or a RecordError naming ``what``."""
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{what} is empty")
    return value


def parse_messages(value: Any, spec: RecordSpec) -> list[dict]:
    """Validate a conversation and return it as ``[{role, content}]`` with kdpipe's role names."""
    name, role_key, content_key = spec.fields["messages"], spec.fields["role"], spec.fields["content"]
    if not isinstance(value, list) or not value:
        raise RecordError(f"{name!r} must be a non-empty list of turns, got {_describe(value)}")
    messages = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, Mapping):
            raise RecordError(f"{where} must be an object with {role_key!r} and {content_key!r}")
        for key in (role_key, content_key):
            if not _present(turn.get(key)):
                raise RecordError(f"{where} has no {key!r}")
        role = spec.roles.get(str(turn[role_key]), turn[role_key])
        if role not in ROLES:
            raise RecordError(
                f"{where}: unknown role {turn[role_key]!r} (roles: {', '.join(ROLES)}; map others with data.roles)"
            )
        if role == "system" and i > 0:
            raise RecordError(f"{where}: a system turn may only come first")
        messages.append({"role": role, "content": _text(turn[content_key], f"{where}.{content_key}")})
    if messages[-1]["role"] == "system":
        raise RecordError(f"{name!r} must end with an assistant turn (or a user turn: a prompt), ends with 'system'")
    return messages


def has_response(record: Mapping, spec: RecordSpec) -> bool:
    """Whether a prompt/response record has a response at all (else it is a prompt only)."""
    column = spec.fields["response"]
    if isinstance(column, dict):
        return any(_present(record.get(col)) for col in column.values())
    return _present(record.get(column))


def parse_responses(record: Mapping, spec: RecordSpec) -> dict[str, str]:
    """The response variants of a prompt/response record, keyed by style (it has one: :func:`has_response`)."""
    column = spec.fields["response"]
    if isinstance(column, dict):  # flat columns, one per style
        variants = {style: record.get(col) for style, col in column.items()}
        where = {style: repr(col) for style, col in column.items()}
    else:
        value = record.get(column)
        if isinstance(value, str):
            text = _text(value, repr(column))
            return {style: text for style in spec.styles}
        if not isinstance(value, Mapping):
            raise RecordError(f"{column!r} must be a string or an object of style variants, got {_describe(value)}")
        variants, where = dict(value), {style: f"{column}.{style}" for style in value}
    responses = {}
    for style, text in variants.items():
        if style not in spec.styles:
            raise RecordError(f"{where[style]}: unknown style {style!r} (data.styles: {list(spec.styles)})")
        if _present(text):
            responses[style] = _text(text, where[style])
    if not responses:
        raise RecordError(f"{column!r} has no variant set")
    return responses


def parse_difficulty(value: Any, name: str) -> int | float:
    """A finite number; integral values become ints (levels group per-level metrics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{name!r} must be a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise RecordError(f"{name!r} must be finite, got {value}")
    return int(value) if float(value).is_integer() else float(value)


def parse_record(record: Any, spec: RecordSpec) -> dict:
    """One raw record as an example dict (see the module docs); raises RecordError when it is invalid."""
    if not isinstance(record, Mapping):
        raise RecordError(f"expected an object, got {_describe(record)}")
    f = spec.fields
    has_messages, has_prompt = _present(record.get(f["messages"])), _present(record.get(f["prompt"]))
    if has_messages and has_prompt:
        raise RecordError(f"has both {f['messages']!r} and {f['prompt']!r}: give one format per record")
    if has_messages:
        example: dict = {"messages": parse_messages(record[f["messages"]], spec)}
        if example["messages"][-1]["role"] == "user":  # a prompt for the next reply, which no one wrote
            example["unlabelled"] = True
    elif has_prompt:
        example = {"prompt": _text(record[f["prompt"]], repr(f["prompt"]))}
        if has_response(record, spec):
            example["responses"] = parse_responses(record, spec)
        else:
            example["unlabelled"] = True
    else:
        raise RecordError(f"missing field: a record needs {f['messages']!r} or {f['prompt']!r}")
    example = {"id": parse_id(record.get(f["id"]), example, spec), **example}
    if _present(record.get(f["difficulty"])):
        example["level"] = parse_difficulty(record[f["difficulty"]], f["difficulty"])
    answer = record.get(f["answer"])
    if _present(answer):
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise RecordError(f"{f['answer']!r} must be a string or a number, got {_describe(answer)}")
        example["answer"] = str(answer)
    return example


def parse_id(value: Any, content: dict, spec: RecordSpec) -> str:
    """The record's own id (a non-empty string or an integer), else a hash of its content."""
    if not _present(value):
        digest = hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
        return f"{spec.id_prefix}-{digest}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(f"{spec.fields['id']!r} must be a string or an integer, got {_describe(value)}")
    if not str(value).strip():
        raise RecordError(f"{spec.fields['id']!r} is empty")
    return str(value)


def parse_records(rows: Iterable[tuple[str, Any]], spec: RecordSpec) -> ParsedRecords:
    """Parse ``(where, record)`` pairs; a record that is an exception (e.g. invalid JSON) is a problem as is.

    Duplicate ids are problems too (the first record with an id is kept)."""
    examples, problems, first_seen, unlabelled = [], [], {}, []
    for where, record in rows:
        try:
            if isinstance(record, Exception):
                raise record
            example = parse_record(record, spec)
        except RecordError as err:
            problems.append(Problem(where, str(err), err.column))
            continue
        if example["id"] in first_seen:
            problems.append(Problem(where, f"duplicate id {example['id']!r} (first at {first_seen[example['id']]})"))
            continue
        first_seen[example["id"]] = where
        examples.append(example)
        if example.get("unlabelled"):
            unlabelled.append((example["id"], where))
    return ParsedRecords(examples, problems, unlabelled)


def check_parsed(parsed: ParsedRecords, spec: RecordSpec, what: str) -> ParsedRecords:
    """Apply the error policy to one parsed split (``what`` names it, e.g. ``data.files.train (x.jsonl)``):
    ``fail`` raises on any problem; ``skip`` logs the dropped count. No valid record at all always raises."""
    if parsed.problems and spec.on_error == "fail":
        raise DataError(
            f"{parsed.skipped} invalid record(s) in {what} (data.on_error=skip drops them):", parsed.problems
        )
    if not parsed.examples:
        raise DataError(f"no valid records in {what}:" if parsed.problems else f"no records in {what}", parsed.problems)
    if parsed.problems:
        first = "; ".join(str(p) for p in parsed.problems[:3])
        log.warning("skipped %d invalid record(s) in %s (data.on_error=skip), e.g. %s", parsed.skipped, what, first)
    return parsed


def _describe(value: Any) -> str:
    """A short description of a wrong value for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
