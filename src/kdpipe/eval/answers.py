"""Final answers: extract one from a reply, normalise it for comparison.

Extractors (each ``text -> str | None``, the *last* answer in the text):

- ``answer_colon``: ``Answer: X`` (the built-in task's format; a number right after the colon, else the rest
  of the line);
- ``last_number``: the last number (``1,000``, ``-3.5``; a minus sign only when it does not follow a word);
- ``boxed``: the content of the last ``\\boxed{...}`` (nested braces allowed);
- ``the_answer_is``: what follows the last "the (final) answer is", up to the end of its sentence or line;
- ``regex``: the last match of a user pattern (its first group when it has one).

:func:`normalize_answer` makes equal answers compare equal: numbers by value (``1,000`` = ``1000``, ``3.0`` =
``3``, ``-0`` = ``0``, ``$5`` = ``5``), other strings ignoring case, runs of whitespace and trailing punctuation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
NUMBER_RE = re.compile(rf"(?<![\w.])[-+]?(?:{_NUM})|(?<=[\w.])(?:{_NUM})")
WHOLE_NUMBER_RE = re.compile(rf"[-+]?\$?\s*(?:{_NUM})%?")
ANSWER_COLON_RE = re.compile(r"Answer:[ \t]*(-?\d[\d,]*(?:\.\d+)?|[^\n]*)")
THE_ANSWER_IS_RE = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\s*:?[ \t]*", re.IGNORECASE)
TRAILING = ".,;:!?。"
WRAPPERS = ("**", "__", "`", '"', "'", "$")

Extractor = Callable[[str], "str | None"]


def answer_colon(text: str) -> str | None:
    """The last ``Answer: X``: a number right after the colon (as the built-in task writes it), else the line."""
    found = [m.strip() for m in ANSWER_COLON_RE.findall(text)]
    return found[-1] if found and found[-1] else None


def last_number(text: str) -> str | None:
    """The last number in the text (with its sign when the sign does not follow a word or a digit)."""
    found = NUMBER_RE.findall(text)
    return found[-1] if found else None


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced; None if there is none (or it is unclosed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
    return None


def the_answer_is(text: str) -> str | None:
    """What follows the last "the answer is" (or "the final answer is"), up to the end of its sentence."""
    found = list(THE_ANSWER_IS_RE.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end() :].split("\n", 1)[0]
    answer = re.split(r"\.\s", rest, maxsplit=1)[0].strip().rstrip(".")  # "3.5" keeps its point
    return answer or None


def regex_extractor(pattern: str) -> Extractor:
    """The last match of ``pattern`` (its first group if it has groups)."""
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if compiled.groups else last.group(0)).strip()

    return extract


EXTRACTORS: dict[str, Extractor] = {
    "answer_colon": answer_colon,
    "last_number": last_number,
    "boxed": boxed,
    "the_answer_is": the_answer_is,
}


def make_extractor(name: str, pattern: str | None = None) -> Extractor:
    """The extractor called ``name``; ``regex`` needs ``pattern``."""
    if name == "regex":
        if not pattern:
            raise ValueError("eval.extractor=regex needs eval.pattern (its first group is the answer)")
        try:
            return regex_extractor(pattern)
        except re.error as err:
            raise ValueError(f"eval.pattern={pattern!r} is not a valid regular expression: {err}") from err
    if name not in EXTRACTORS:
        raise ValueError(f"eval.extractor={name!r}: choose one of {[*EXTRACTORS, 'regex']}")
    return EXTRACTORS[name]


def normalize_number(text: str) -> str | None:
    """The canonical form of a number written as ``text`` (``1,000.50`` -> ``1000.5``), or None."""
    if not WHOLE_NUMBER_RE.fullmatch(text.strip()):
        return None
    plain = re.sub(r"[\s,$%]", "", text)
    try:
        value = Decimal(plain)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # also -0 -> 0
    return format(value.normalize(), "f")


def normalize_answer(text: str | None) -> str | None:
    """``text`` as compared: a number by value, anything else without case, extra whitespace, trailing
    punctuation or wrapping markup (``**bold**``, quotes, ``$...$``); None stays None."""
    if text is None:
        return None
    value = text.strip()
    changed = True
    while changed and value:
        changed = False
        stripped = value.rstrip(TRAILING).rstrip()
        for wrap in WRAPPERS:
            if len(stripped) > 2 * len(wrap) and stripped.startswith(wrap) and stripped.endswith(wrap):
                stripped = stripped[len(wrap) : -len(wrap)].strip()
        if stripped != value:
            value, changed = stripped, True
    number = normalize_number(value)
    return number if number is not None else " ".join(value.casefold().split())
