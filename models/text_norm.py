"""Text normalisation: written English -> the spoken form the recogniser's vocabulary can hold.

In: any text (sentences, LM training text, references, user labels). Out: lowercase words over ``VOCAB``
(letters, apostrophe, single spaces) written as they are said: ``"Call me at 2:30pm"`` ->
``"call me at two thirty p m"``, ``"$4.50"`` -> ``"four dollars and fifty cents"``, ``"3rd"`` -> ``"third"``,
``"1984"`` -> ``"nineteen eighty four"``, ``"IBM"`` -> ``"i b m"``, ``"10%"`` -> ``"ten percent"``.

This is the ONE normaliser of the project: corpus labels (``tasks.corpora_text``), the text a character LM
is fitted on (``tasks.evaluation``) and the references of an evaluation all go through ``normalize_text``,
so a number or a time is never spelled one way in a label and another way in the LM. It lives in
``models/`` because the model layer (decoding, metrics) needs it and tasks import downwards.

Why not num2words: it installs here (0.5.14), but it writes "two thousand and twenty-six" with hyphens,
commas and "and", which would need this much post-processing anyway; the rules below are what the
synthesizers are given, so the label is exactly what is said.
"""

from __future__ import annotations

import re
import unicodedata

VOCAB = " 'abcdefghijklmnopqrstuvwxyz"  # same characters as models.asr_ctc.DEFAULT_VOCAB (blank excluded)

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1_000, "thousand"), (100, "hundred"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}
MONTHS = ("january february march april may june july august september october november december").split()

_TIME = re.compile(r"\b(\d{1,2}):(\d{2})\s*([ap])\.?\s?m\b\.?|\b(\d{1,2}):(\d{2})\b|\b(\d{1,2})\s*([ap])\.?m\b\.?",
                   re.IGNORECASE)
_MONEY = re.compile(r"([$\u00a3\u20ac])(\d[\d,]*)(?:\.(\d{2}))?")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_DATE = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_DECIMAL = re.compile(r"\b(\d+)\.(\d+)\b")
_ACRONYM = re.compile(r"\b[A-Z]{2,5}\b")
_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "\u00a3": ("pound", "pounds", "penny", "pence"),
             "\u20ac": ("euro", "euros", "cent", "cents")}


def number_words(value: int) -> str:
    """Spell out a non-negative integer: ``1984 -> "one thousand nine hundred eighty four"`` (no "and").

    Raises:
        ValueError: when ``value`` is negative or 10**12 or more.
    """
    if not 0 <= value < 10**12:
        raise ValueError(f"cannot spell {value}; supported range is 0 .. 10**12 - 1")
    if value < 20:
        return _ONES[value]
    if value < 100:
        tens, ones = divmod(value, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    for scale, name in _SCALES:
        if value >= scale:
            high, rest = divmod(value, scale)
            return f"{number_words(high)} {name}" + (f" {number_words(rest)}" if rest else "")
    raise AssertionError("unreachable")  # pragma: no cover


def ordinal_words(value: int) -> str:
    """``1 -> "first"``, ``22 -> "twenty second"``, ``40 -> "fortieth"``, ``100 -> "one hundredth"``."""
    words = number_words(value).split()
    last = words[-1]
    if last in _ORDINAL_IRREGULAR:
        words[-1] = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def year_words(value: int) -> str:
    """A year as said: ``1984 -> "nineteen eighty four"``, ``1905 -> "nineteen oh five"``,
    ``2000 -> "two thousand"``, ``2007 -> "two thousand seven"``, ``2026 -> "twenty twenty six"``."""
    high, low = divmod(value, 100)
    if value < 1000 or 2000 <= value < 2010 or low == 0 and high % 10 == 0:
        return number_words(value)
    if low == 0:
        return f"{number_words(high)} hundred"
    return f"{number_words(high)} " + (f"oh {_ONES[low]}" if low < 10 else number_words(low))


def time_words(hour: int, minute: int, meridiem: str | None = None) -> str:
    """``(2, 30, "p") -> "two thirty p m"``, ``(9, 5, None) -> "nine oh five"``, ``(7, 0, "a") -> "seven a m"``,
    ``(12, 0, None) -> "twelve o'clock"``."""
    words = number_words(hour)
    if minute:
        words += " " + (f"oh {_ONES[minute]}" if minute < 10 else number_words(minute))
    elif meridiem is None:
        words += " o'clock"
    return words + (f" {meridiem.lower()} m" if meridiem else "")


def money_words(whole: int, cents: int = 0, currency: str = "$") -> str:
    """``(4, 50) -> "four dollars and fifty cents"``, ``(1, 0) -> "one dollar"``, ``(0, 5) -> "five cents"``."""
    one, many, sub_one, sub_many = _CURRENCY[currency]
    parts = [f"{number_words(whole)} {one if whole == 1 else many}"] if whole or not cents else []
    if cents:
        parts.append(f"{number_words(cents)} {sub_one if cents == 1 else sub_many}")
    return " and ".join(parts)


def date_words(month: int, day: int, year: int | None = None) -> str:
    """``(3, 14, 2027) -> "march fourteenth twenty twenty seven"``.

    Raises:
        ValueError: for a month outside 1-12 or a day outside 1-31.
    """
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise ValueError(f"not a date: month {month}, day {day}")
    return f"{MONTHS[month - 1]} {ordinal_words(day)}" + (f" {year_words(year)}" if year else "")


def spell_letters(word: str) -> str:
    """``"Smith" -> "s m i t h"``; digits are said one by one (``"A7" -> "a seven"``); other characters drop."""
    return " ".join(_ONES[int(c)] if c.isdigit() else c.lower() for c in word if c.isalnum() and c.isascii())


def _digits(match: re.Match[str]) -> str:
    token = match.group(0)
    value = int(token)
    if len(token) == 4 and 1100 <= value <= 2099:
        return year_words(value)
    if len(token) > 12 or (len(token) > 1 and token.startswith("0")):
        return " ".join(_ONES[int(c)] for c in token)  # codes and account numbers are said digit by digit
    return number_words(value)


def _time(m: re.Match[str]) -> str:
    if m.group(1):
        return f" {time_words(int(m.group(1)), int(m.group(2)), m.group(3))} "
    if m.group(4):
        return f" {time_words(int(m.group(4)), int(m.group(5)))} " if int(m.group(4)) < 25 else m.group(0)
    return f" {time_words(int(m.group(6)), 0, m.group(7))} "


def _money(m: re.Match[str]) -> str:
    return f" {money_words(int(m.group(2).replace(',', '')), int(m.group(3) or 0), m.group(1))} "


def _date(m: re.Match[str]) -> str:
    try:
        return f" {date_words(int(m.group(1)), int(m.group(2)), int(m.group(3)))} "
    except ValueError:
        return m.group(0).replace("/", " ")


def normalize_text(text: str) -> str:
    """The spoken form of ``text`` over ``VOCAB`` (may be empty; never raises).

    Order: times, money, dates (m/d/yyyy), percentages, ordinals, decimals ("point"), acronyms in capitals
    spelled out, then "&" -> "and", thousands separators dropped, remaining numbers spelled (4-digit
    1100-2099 as years, leading-zero codes digit by digit), hyphens, slashes and other punctuation become
    spaces, curly apostrophes straight, quotes around words dropped, anything else outside ``VOCAB`` removed.
    """
    s = unicodedata.normalize("NFKD", text.replace("\u2019", "'").replace("\u2018", "'"))
    s = "".join(c for c in s if not unicodedata.combining(c))  # "caf\u00e9" -> "cafe", not "caf"
    s = _TIME.sub(_time, s)
    s = _MONEY.sub(_money, s)
    s = _DATE.sub(_date, s)
    s = _PERCENT.sub(lambda m: f" {m.group(1)} percent ", s)
    s = _ORDINAL.sub(lambda m: f" {ordinal_words(int(m.group(1)))} " if len(m.group(1)) <= 12 else m.group(0), s)
    s = _DECIMAL.sub(lambda m: f" {m.group(1)} point {' '.join(m.group(2))} ", s)
    s = _ACRONYM.sub(lambda m: f" {spell_letters(m.group(0))} ", s)
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s.replace("&", " and "))
    s = re.sub(r"\d+", lambda m: f" {_digits(m)} ", s)
    s = re.sub(r"[^a-z' ]+", " ", s.lower())
    words = (w.strip("'") for w in s.split())
    return " ".join(w for w in words if w)
