"""Extractors and the normaliser on tricky strings."""

from __future__ import annotations

import pytest

from kdpipe.eval.answers import (
    answer_colon,
    boxed,
    last_number,
    make_extractor,
    normalize_answer,
    normalize_number,
    the_answer_is,
)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("1,000", "1000"),
        ("3.0", "3"),
        ("-0", "0"),
        ("+7", "7"),
        ("$5", "5"),
        ("3.50", "3.5"),
        ("1,234,567.80", "1234567.8"),
        ("42.", "42"),
        ("**42**", "42"),
        ("$12$", "12"),
        ("Paris.", "paris"),
        ("  New   York!  ", "new york"),
        ('"yes"', "YES"),
        ("50%", "50"),
    ],
)
def test_equal_answers_normalise_alike(left, right):
    assert normalize_answer(left) == normalize_answer(right)


@pytest.mark.parametrize(
    ("left", "right"),
    [("1,00", "100"), ("3.01", "3"), ("-3", "3"), ("12", "1.2"), ("new york", "newyork"), ("0.5", "5")],
)
def test_different_answers_stay_different(left, right):
    assert normalize_answer(left) != normalize_answer(right)


def test_normalize_number_only_takes_whole_numbers():
    assert normalize_number("7 apples") is None and normalize_number("1e5") is None
    assert normalize_number("-0.0") == "0" and normalize_number(".5") == "0.5"
    assert normalize_answer(None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10-3=7, so the result is 7.", "7"),
        ("The total is -5 degrees", "-5"),
        ("5-3 = 2", "2"),  # a minus after a digit is an operator
        ("it costs $1,234.50.", "1,234.50"),
        ("version2 then 3.25", "3.25"),
        ("abc123", "123"),
        ("no digits here", None),
        ("1,2,3", "3"),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_answer_colon_matches_the_built_in_format_and_takes_the_last():
    assert answer_colon("1+2=3\nAnswer: 3") == "3"
    assert answer_colon("Answer: 1\nAnswer: 42") == "42"
    assert answer_colon("Answer: 42abc") == "42"  # a number right after the colon, as the task reads it
    assert answer_colon("Answer: Paris.\n") == "Paris."
    assert answer_colon("answer: 3") is None and answer_colon("Answer:") is None


def test_boxed_balances_braces_and_takes_the_last():
    assert boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert boxed(r"\boxed{ 12 }") == "12"
    assert boxed(r"unclosed \boxed{3") is None and boxed("none") is None


def test_the_answer_is_stops_at_the_end_of_its_sentence():
    assert the_answer_is("So the answer is 22.") == "22"
    assert the_answer_is("The final answer is: 3.5. Hope this helps.") == "3.5"
    assert the_answer_is("THE ANSWER IS Paris\nmore") == "Paris"
    assert the_answer_is("the answer is 1. The answer is 2.") == "2"
    assert the_answer_is("no such phrase") is None


def test_regex_extractor_takes_the_first_group_of_the_last_match():
    extract = make_extractor("regex", r"#### (\S+)")
    assert extract("#### 3\nwait\n#### 4") == "4"
    assert make_extractor("regex", r"\d+")("a 1 b 22") == "22"  # no group: the whole match
    with pytest.raises(ValueError, match=r"needs eval\.pattern"):
        make_extractor("regex")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        make_extractor("regex", "(")
    with pytest.raises(ValueError, match="choose one of"):
        make_extractor("nope")
