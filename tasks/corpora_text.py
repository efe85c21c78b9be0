"""Stage 0 (labelled corpora): English text for speech synthesis, written as it is spoken.

In: the Debian ``fortunes`` package's text files (about 15,000 quotations, jokes and proverbs under
``/usr/share/games/fortunes``), the ``wamerican`` word list (``/usr/share/dict/words``) and the templates
below. Out: transcripts over ``VOCAB`` from five sources (``TEXT_SOURCES``), each with a fixed split:
``sentence_split`` hashes the transcript, so a sentence is in the same split in every run and every corpus
kind, and no test sentence is ever spoken in train or val.

The sources, so the recogniser hears how people talk on a call and not only written prose:
- ``fortunes``: real English sentences of 3-15 words, every word in the word list (long, varied, literary);
- ``call_centre``: templated agent/caller turns with account numbers, amounts, dates and times;
- ``commands``: short prompts and commands ("set a timer for ten minutes", "call harrison");
- ``numbers``: digits, amounts, times, dates and ordinals said on their own or in a short frame;
- ``spelled``: names and codes spelled letter by letter ("that's s m i t h").
Templates are written as people write them ("$4.50", "2:30pm", "3/14/2027") and turned into the spoken
form by ``models.text_norm.normalize_text``, the same normaliser that LM text and evaluation use; the
synthesizers are given that spoken form, so the transcript is what is said.
"""

from __future__ import annotations

import functools
import logging
import re
import zlib
from pathlib import Path

import numpy as np

from audiopipe.models.text_norm import VOCAB, normalize_text, number_words, spell_letters

logger = logging.getLogger(__name__)

__all__ = ["VOCAB", "number_words", "normalize_text", "clean_sentence", "sentence_split", "load_sentences",
           "load_lexicon", "make_sentence", "TEXT_SOURCES", "training_text"]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDS_FILE = Path("/usr/share/dict/words")
MIN_WORDS, MAX_WORDS = 3, 15
SKIPPED_FORTUNE_FILES = frozenset({"ascii-art"})  # pictures, not sentences
# Abbreviations the synthesizers expand ("mr" -> "mister"), so the written word would not be what is heard.
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "wm", "co", "inc", "ltd",
                           "ft", "lb", "oz", "mt", "gen", "col", "capt", "prof", "rev", "sgt", "lt"})
# Split by sentence hash: residues modulo 20 (10% test, 10% val, 80% train).
TEST_RESIDUES, VAL_RESIDUES = frozenset({0, 1}), frozenset({2, 3})
# Probability of each text source per utterance (documented in docs/corpora.md).
TEXT_SOURCES: dict[str, float] = {"fortunes": 0.45, "call_centre": 0.2, "commands": 0.15, "numbers": 0.12,
                                  "spelled": 0.08}
MAX_DRAWS = 200  # templated sentences are redrawn until one hashes to the wanted split (10% for test: ~10)

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_NUMBER = re.compile(r"\d+")

CALL_CENTRE = (
    "Thank you for calling, my name is {name}, how can I help you today?",
    "Can I have your account number please?", "My account number is {digits}.",
    "Your balance is {money} as of {date}.", "I was charged {money} twice on {date}.",
    "Your appointment is on {date} at {time}.", "Can we move it to {weekday} at {time}?",
    "Please hold while I transfer you to {dept}.", "Press {digit} for {dept}, or stay on the line.",
    "Your call is important to us, the wait time is about {small} minutes.",
    "The payment of {money} is due on the {ordinal} of {month}.",
    "I'd like to cancel my order number {digits}.", "Your reference number is {code}.",
    "Is there anything else I can help you with today?", "The technician will arrive between {time} and {time}.",
    "I've been on hold for {small} minutes and nobody answered.", "Could you spell your last name for me?",
    "We open at {time} and close at {time}, {weekday} to {weekday}.", "Your order shipped on {date}.",
    "The refund of {money} will show up in {small} business days.", "I'm calling about invoice {digits}.",
)
COMMANDS = (
    "Call {name}.", "Call {name} on {weekday}.", "Play some {word} music.", "Set a timer for {small} minutes.",
    "Wake me up at {time}.", "Remind me to buy {word} at {time}.", "What's the weather in {place}?",
    "Search for {word}.", "Send a message to {name}.", "Turn the volume up to {small}.", "Stop.", "Yes, please.",
    "No, thank you.", "Go back.", "Repeat that.", "Cancel my {time} meeting.", "Book a table for {small}.",
    "Navigate to {place}.", "Add {word} to my list.", "What time is it in {place}?", "Read my messages.",
    "Skip this song.", "Open the {word} file.", "Speak to an agent.", "Check my balance.",
)
NUMBERS = (
    "{number}", "{digits}", "{money}", "{time}", "{date}", "It's {number}.", "About {number} people came.",
    "That comes to {money}.", "The meeting is at {time}.", "It was the {ordinal} time.", "Born on {date}.",
    "The total is {money}, not {money}.", "Flight {small} leaves at {time} on {date}.", "In {year}.",
    "Room {number}, floor {small}.", "It went up {percent} last year.",
)
SPELLED = (
    "My last name is {name}, that's {spell}.", "That's {spell}.", "The code is {letters}.",
    "{name}, spelled {spell}.", "Is that {letter} as in {word}?", "Your confirmation code is {letters}.",
    "{spell}.", "Postcode {letters}.",
)
DEPARTMENTS = ("billing", "sales", "support", "accounts", "returns", "the pharmacy", "customer service")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_TEMPLATES = {"call_centre": CALL_CENTRE, "commands": COMMANDS, "numbers": NUMBERS, "spelled": SPELLED}


def clean_sentence(raw: str, *, lexicon: frozenset[str]) -> str | None:
    """Normalise one written fortunes sentence to a transcript over ``VOCAB``, or refuse it.

    ``normalize_text`` does the spelling out ("1,000" -> "one thousand", "&" -> "and"). The sentence is
    refused (``None``) when it would not read as prose: an acronym in capitals, an abbreviation, an
    initial, a word mixing letters and digits, a word missing from ``lexicon`` (the synthesizer would guess
    its pronunciation), or fewer than 3 / more than 15 words.

    Args:
        raw: One sentence as written (any case and punctuation).
        lexicon: Lowercase words accepted (apostrophes included, e.g. ``"don't"``).

    Returns:
        The transcript (single spaces, no leading/trailing space), or ``None``.
    """
    for token in re.sub(r"[-\u2013\u2014_/.,;:!?\"()\[\]`*]+", " ", raw).split():
        token = token.strip("'")
        if (len(token) > 1 and token.isupper()) or (_NUMBER.search(token) and not token.isdigit()):
            return None
    words = normalize_text(raw).split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    spelled = {w for token in re.findall(r"\d+", raw) for w in normalize_text(token).split()}
    for word in words:
        if word in ABBREVIATIONS or (len(word) == 1 and word not in ("a", "i")):
            return None
        if word not in lexicon and word not in spelled:
            return None
    return " ".join(words)


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
def slot_words(words_file: Path = WORDS_FILE) -> dict[str, tuple[str, ...]]:
    """Words for template slots from the word list: ``"common"`` (lowercase, 3-9 letters) and ``"names"``
    (capitalised entries: people's and places' names, 3-9 letters), each sorted."""
    load_lexicon(words_file)  # the clear error when the list is missing
    raw = [w.strip() for w in words_file.read_text("utf-8", errors="replace").splitlines()]
    plain = [w for w in raw if w.isascii() and w.isalpha() and 3 <= len(w) <= 9]
    return {"common": tuple(sorted(w for w in plain if w.islower())),
            "names": tuple(sorted(w for w in plain if w[0].isupper() and w[1:].islower()))}


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


def _with_suffix(day: int) -> str:
    """``1 -> "1st"``, ``12 -> "12th"``, ``23 -> "23rd"``."""
    return f"{day}" + ("th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th"))


def _slot(name: str, rng: np.random.Generator) -> str:
    """One written slot value (``"$4.50"``, ``"2:30pm"``, ``"Smith"``...), as a person would type it."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731 - local shorthand
    words = slot_words()
    hour, minute = int(rng.integers(1, 13)), int(pick((0, 0, 15, 30, 45, int(rng.integers(60)))))
    letters = "".join(pick("ABCDEFGHJKLMNPRSTUVWXYZ23456789") for _ in range(int(rng.integers(3, 7))))
    values = {
        "name": lambda: pick(words["names"]), "place": lambda: pick(words["names"]),
        "word": lambda: pick(words["common"]), "dept": lambda: pick(DEPARTMENTS),
        "weekday": lambda: pick(WEEKDAYS), "digit": lambda: str(int(rng.integers(10))),
        "small": lambda: str(int(rng.integers(2, 60))), "number": lambda: str(int(rng.integers(0, 100_000))),
        "digits": lambda: "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(4, 9)))),
        "money": lambda: f"${int(rng.integers(0, 2000)):,}" + (f".{int(rng.integers(1, 100)):02d}"
                                                                if rng.random() < 0.6 else ""),
        "time": lambda: (f"{hour}:{minute:02d}{pick(('am', 'pm', '', ' p.m.'))}" if minute
                         else f"{hour}{pick(('am', 'pm', ' a.m.'))}"),
        "date": lambda: f"{int(rng.integers(1, 13))}/{int(rng.integers(1, 29))}/{int(rng.integers(1990, 2036))}",
        "year": lambda: str(int(rng.integers(1900, 2036))), "percent": lambda: f"{int(rng.integers(1, 100))}%",
        "ordinal": lambda: _with_suffix(int(rng.integers(1, 32))),
        "month": lambda: pick(("January", "March", "April", "June", "July", "August", "October", "December")),
        "code": lambda: letters, "letters": lambda: letters, "letter": lambda: pick("ABCDEFGHJKLMNPRSTUVWY"),
    }
    if name == "spell":
        return spell_letters(pick(words["names"]))
    return values[name]()


def render_template(template: str, rng: np.random.Generator) -> str:
    """``template`` with each ``{slot}`` filled by ``_slot``, normalised to the spoken form.

    ``{letters}``/``{code}``/``{letter}`` are spelled (``spell_letters``) before normalising, so a code is said
    letter by letter whatever its case; ``{spell}`` spells the template's ``{name}`` (a new name without one).
    """
    names: list[str] = []

    def fill(m: re.Match[str]) -> str:
        slot = m.group(1)
        if slot == "spell" and names:
            return spell_letters(names[-1])
        value = _slot(slot, rng)
        if slot == "name":
            names.append(value)
        return spell_letters(value) if slot in ("letters", "code", "letter") else value
    return normalize_text(re.sub(r"\{(\w+)\}", fill, template))


def make_sentence(split: str, rng: np.random.Generator) -> tuple[str, str]:
    """A transcript of ``split`` from a source drawn by ``TEXT_SOURCES`` -> ``(text, source)``.

    Templated sources are redrawn until the rendered sentence hashes to ``split`` (``sentence_split``),
    at most ``MAX_DRAWS`` times; past that the sentence is a fortune of the split.

    Raises:
        ValueError: for an unknown split. FileNotFoundError: when the text packages are missing.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; use train, val or test")
    names = list(TEXT_SOURCES)
    source = names[int(rng.choice(len(names), p=list(TEXT_SOURCES.values())))]
    if source != "fortunes":
        templates = _TEMPLATES[source]
        for _ in range(MAX_DRAWS):
            text = render_template(templates[int(rng.integers(len(templates)))], rng)
            if text and sentence_split(text) == split:
                return text, source
    pool = load_sentences()[split]
    return pool[int(rng.integers(len(pool)))], "fortunes"


def training_text(num_sentences: int = 20_000, *, seed: int = 0) -> list[str]:
    """Text to fit a character LM on: every fortunes training sentence plus ``num_sentences`` templated
    sentences of the train split (sources in ``TEXT_SOURCES`` proportions), never a val or test sentence."""
    rng = np.random.default_rng([seed, zlib.crc32(b"lm-text")])
    templated = (make_sentence("train", rng) for _ in range(num_sentences * 2))
    extra = [text for text, source in templated if source != "fortunes"][:num_sentences]
    return list(load_sentences()["train"]) + extra
