"""Stage 0 (labelled corpora): English sentences for speech synthesis, cleaned to a CTC vocabulary.

In: the Debian ``fortunes`` package's text files (about 15,000 quotations, jokes and proverbs under
``/usr/share/games/fortunes``) and the ``wamerican`` word list (``/usr/share/dict/words``) as a lexicon.
Out: sentences of 3-15 words over ``VOCAB`` (lowercase letters, apostrophe, space; digits spelled out),
each with a fixed split: ``sentence_split`` hashes the sentence, so a sentence is in the same split in
every run and every corpus kind.

Why these: both ship in Debian's registry (nothing is downloaded at run time), the fortunes are real
English written by people (open vocabulary, varied syntax, names), and every kept word is in the word list,
so the transcript is what a speech synthesizer says when given it and a lexicon for decoding is at hand.
"""

from __future__ import annotations

import functools
import logging
import re
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDS_FILE = Path("/usr/share/dict/words")
VOCAB = " 'abcdefghijklmnopqrstuvwxyz"  # CTC characters; the model adds its blank at index 0
MIN_WORDS, MAX_WORDS = 3, 15
SKIPPED_FORTUNE_FILES = frozenset({"ascii-art"})  # pictures, not sentences
# Abbreviations the synthesizers expand ("mr" -> "mister"), so the written word would not be what is heard.
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "wm", "co", "inc", "ltd",
                           "ft", "lb", "oz", "mt", "gen", "col", "capt", "prof", "rev", "sgt", "lt"})
# Split by sentence hash: residues modulo 20 (10% test, 10% val, 80% train).
TEST_RESIDUES, VAL_RESIDUES = frozenset({0, 1}), frozenset({2, 3})

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1_000, "thousand"), (100, "hundred"))
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_NUMBER = re.compile(r"\d+")


def number_words(value: int) -> str:
    """Spell out a non-negative integer in English words over ``VOCAB``.

    Args:
        value: 0 <= value < 10**12.

    Returns:
        e.g. ``1984 -> "one thousand nine hundred eighty four"`` (no "and", no hyphens).

    Raises:
        ValueError: when ``value`` is negative or too large.
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


def clean_sentence(raw: str, *, lexicon: frozenset[str]) -> str | None:
    """Normalise one written sentence to a transcript over ``VOCAB``, or refuse it.

    Numbers become words ("1,000" -> "one thousand"), "&" becomes "and", hyphens and dashes become
    spaces and other punctuation is dropped. The sentence is refused (``None``) when what a synthesizer
    would say is unclear: an acronym in capitals, an abbreviation, an initial, a symbol left over, a word
    mixing letters and digits, a word missing from ``lexicon``, or fewer than 3 / more than 15 words.

    Args:
        raw: One sentence as written (any case and punctuation).
        lexicon: Lowercase words accepted (apostrophes included, e.g. ``"don't"``).

    Returns:
        The transcript (single spaces, no leading/trailing space), or ``None``.
    """
    text = re.sub(r"(?<=\d),(?=\d{3})", "", raw.replace("&", " and ").replace("%", " percent "))
    text = re.sub(r"[-\u2013\u2014_/]+", " ", text)
    text = re.sub(r"[.,;:!?\"()\[\]`*]+", " ", text).replace("\u2019", "'")
    words: list[str] = []
    for token in text.split():
        token = token.strip("'")
        if not token:
            continue
        if token.isdigit() and len(token) <= 12:
            words.extend(number_words(int(token)).split())
            continue
        if (len(token) > 1 and token.isupper()) or _NUMBER.search(token):
            return None
        words.append(token.lower())
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    for word in words:
        if word in ABBREVIATIONS or (len(word) == 1 and word not in ("a", "i")) or word not in lexicon:
            return None
    sentence = " ".join(words)
    return sentence if set(sentence) <= set(VOCAB) else None


def sentence_split(sentence: str) -> str:
    """The split (``"train"``, ``"val"`` or ``"test"``) a cleaned sentence belongs to, fixed by its hash."""
    residue = zlib.crc32(sentence.encode("utf-8")) % 20
    return "test" if residue in TEST_RESIDUES else "val" if residue in VAL_RESIDUES else "train"


def split_fortunes(text: str) -> list[str]:
    """Sentences of one fortune file's text: fortunes are separated by ``%`` lines, attributions
    (lines starting with ``--`` after whitespace) are dropped and line breaks inside a sentence joined."""
    sentences: list[str] = []
    for fortune in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        body = " ".join(line for line in fortune.splitlines() if not line.strip().startswith("--"))
        sentences.extend(s.strip() for s in _SENTENCE_END.split(body) if s.strip())
    return sentences


@functools.lru_cache(maxsize=4)
def load_lexicon(words_file: Path = WORDS_FILE) -> frozenset[str]:
    """Lowercased words of a word list, one per line (``wamerican``'s ``/usr/share/dict/words``).

    Raises:
        FileNotFoundError: naming the Debian package to install.
    """
    if not words_file.is_file():
        raise FileNotFoundError(f"{words_file} not found; install the Debian package 'wamerican' "
                                "(apt-get install wamerican), see scripts/bootstrap.sh")
    return frozenset(w.strip().lower() for w in words_file.read_text("utf-8", errors="replace").splitlines())


@functools.lru_cache(maxsize=4)
def load_sentences(fortunes_dir: Path = FORTUNES_DIR, words_file: Path = WORDS_FILE) -> dict[str, tuple[str, ...]]:
    """Every usable cleaned sentence of the fortunes, grouped by split.

    Returns:
        ``{"train": (...), "val": (...), "test": (...)}``, each sorted and without duplicates.

    Raises:
        FileNotFoundError: when the fortunes or the word list are missing (naming the packages).
    """
    files = sorted(p for p in fortunes_dir.glob("*") if p.is_file() and "." not in p.name
                   and p.name not in SKIPPED_FORTUNE_FILES) if fortunes_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no fortune files under {fortunes_dir}; install the Debian package 'fortunes' "
                                "(apt-get install fortunes), see scripts/bootstrap.sh")
    lexicon = load_lexicon(words_file)
    kept: set[str] = set()
    for path in files:
        for raw in split_fortunes(path.read_text("utf-8", errors="replace")):
            sentence = clean_sentence(raw, lexicon=lexicon)
            if sentence is not None:
                kept.add(sentence)
    by_split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for sentence in sorted(kept):
        by_split[sentence_split(sentence)].append(sentence)
    logger.info("%d sentences from %d fortune files", len(kept), len(files))
    return {split: tuple(items) for split, items in by_split.items()}
