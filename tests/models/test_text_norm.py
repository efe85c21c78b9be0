"""The one text normaliser (labels, LM text, evaluation): written English -> spoken form over VOCAB."""

from __future__ import annotations

import pytest

from audiopipe.models.asr_ctc import DEFAULT_VOCAB
from audiopipe.models.text_norm import (VOCAB, date_words, money_words, normalize_text, ordinal_words, time_words,
                                        year_words)


@pytest.mark.parametrize(("written", "spoken"), [
    ("Call me at 2:30pm, OK?", "call me at two thirty p m o k"),
    ("It costs $4.50 or $1,200.", "it costs four dollars and fifty cents or one thousand two hundred dollars"),
    ("That's $1 and 5 cents... no, $0.05", "that's one dollar and five cents no five cents"),
    ("On 3/14/2027 at 9:05", "on march fourteenth twenty twenty seven at nine oh five"),
    ("The 3rd of May 1984", "the third of may nineteen eighty four"),
    ("IBM rose 10% in 2026", "i b m rose ten percent in twenty twenty six"),
    ("Account 00734, caf\u00e9 & bar", "account zero zero seven three four cafe and bar"),
    ("It\u2019s 7 a.m. now", "it's seven a m now"),
    ("meet at 12:00", "meet at twelve o'clock"),
    ("pi is 3.14", "pi is three point one four"),
    ("rock-n-roll \"quoted\" (really)", "rock n roll quoted really"),
    ("22nd 40th 100th 11th", "twenty second fortieth one hundredth eleventh"),
    ("in 1905 and 2000 and 2007", "in nineteen oh five and two thousand and two thousand seven"),
    ("   ", ""),
])
def test_normalize_text(written: str, spoken: str) -> None:
    assert normalize_text(written) == spoken


def test_output_is_always_the_model_vocabulary() -> None:
    assert VOCAB == DEFAULT_VOCAB
    junk = "\u00bfQu\u00e9? \u2014 10\u20ac/\u00a35 <b>#1</b> \U0001f600 tab\tnew\nline 1e9 99999999999999"
    out = normalize_text(junk)
    assert set(out) <= set(VOCAB) and out == " ".join(out.split())
    assert normalize_text(out) == out  # idempotent on its own output


@pytest.mark.parametrize(("fn", "args", "spoken"), [
    (ordinal_words, (1,), "first"), (ordinal_words, (12,), "twelfth"), (ordinal_words, (23,), "twenty third"),
    (year_words, (1800,), "eighteen hundred"), (year_words, (2010,), "twenty ten"),
    (time_words, (2, 30, "p"), "two thirty p m"), (time_words, (7, 0, "a"), "seven a m"),
    (money_words, (1, 1), "one dollar and one cent"), (money_words, (3, 0, "\u00a3"), "three pounds"),
    (date_words, (12, 31, None), "december thirty first"),
])
def test_spoken_forms(fn, args, spoken: str) -> None:
    assert fn(*args) == spoken


def test_bad_date_is_refused() -> None:
    with pytest.raises(ValueError, match="not a date"):
        date_words(13, 1)
