"""Stage 0 (labelled corpora): symbolic music from music21's bundled Bach chorales, and its rendering.

In: the chorales that ship inside the ``music21`` wheel (MusicXML, no download); optionally the
``fluidsynth`` executable and a General MIDI SoundFont (Debian ``fluid-soundfont-gm``).
Out: MIDI files, the melody (soprano) of each score as MIDI pitch and quarter-length tokens for next-note
modelling, and WAV renderings.

music21 is imported inside the functions: it takes about half a second to import, and the CLI imports
this module for every command.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
RENDER_SAMPLE_RATE_HZ = 16_000
TRANSPOSE_SEMITONES = (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6)  # for passes beyond the first over the works
MELODY_PART_NAMES = ("soprano",)


@functools.lru_cache(maxsize=1)
def chorale_paths() -> tuple[Path, ...]:
    """The Bach chorales in music21's corpus (``bwv*.mxl``), sorted by file name.

    Raises:
        FileNotFoundError: when the music21 corpus has none (a music21 install without its corpus).
    """
    from music21 import corpus

    paths = tuple(sorted((Path(p) for p in corpus.getComposer("bach")
                          if Path(p).suffix == ".mxl" and Path(p).name.startswith("bwv")), key=lambda p: p.name))
    if not paths:
        raise FileNotFoundError("music21's corpus has no Bach chorales (bwv*.mxl); reinstall music21 from PyPI")
    return paths


def work_split(work: str) -> str:
    """The split of a work (e.g. ``"bwv66.6"``), fixed by its hash: 10% test, 10% val, 80% train."""
    residue = zlib.crc32(work.encode("utf-8")) % 20
    return "test" if residue < 2 else "val" if residue < 4 else "train"


def melody_part(score: Any) -> Any:
    """The score's melody: the first part named Soprano..., else the part with the highest mean pitch.

    Raises:
        ValueError: when the score has no part with notes.
    """
    parts = [p for p in score.parts if p.flatten().notes]
    if not parts:
        raise ValueError("score has no part with notes")
    for part in parts:  # "Soprano", also "Soprano 1" in the double-choir chorales
        if (part.partName or str(part.id) or "").strip().lower().startswith(MELODY_PART_NAMES):
            return part
    return max(parts, key=lambda p: sum(_top_midi(n) for n in p.flatten().notes) / len(p.flatten().notes))


def _top_midi(element: Any) -> int:
    return max(p.midi for p in element.pitches)


def melody_tokens(score: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Pitch and duration tokens of the melody, one per sounding note: ties merged, rests and grace notes
    dropped, chords reduced to their top note.

    Returns:
        ``(pitches, durations_ql)``: MIDI note numbers (60 = middle C) and durations in quarter notes.
    """
    notes = melody_part(score).stripTies().flatten().notes
    kept = [n for n in notes if float(n.duration.quarterLength) > 0]
    return tuple(_top_midi(n) for n in kept), tuple(round(float(n.duration.quarterLength), 4) for n in kept)


def load_chorale(path: Path, *, transpose: int = 0) -> Any:
    """Parse one chorale (a ``music21.stream.Score``), transposed by ``transpose`` semitones."""
    from music21 import converter

    score = converter.parse(str(path))
    return score.transpose(transpose) if transpose else score


def save_midi(score: Any, path: Path) -> None:
    """Write every part of ``score`` as a standard MIDI file at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    score.write("midi", fp=str(path))


def render_midi(midi: Path, wav: Path, *, soundfont: Path = SOUNDFONT,
                sample_rate_hz: int = RENDER_SAMPLE_RATE_HZ) -> bool:
    """Render ``midi`` to a 16-bit WAV with fluidsynth (no audio device, no shell).

    Returns:
        False, with a log line and no file, when fluidsynth or the SoundFont is not installed; True when
        ``wav`` was written.

    Raises:
        RuntimeError: when fluidsynth is installed but fails or writes nothing.
    """
    exe = shutil.which("fluidsynth")
    if exe is None or not soundfont.is_file():
        logger.warning("not rendering %s: needs the fluidsynth executable and %s (Debian packages fluidsynth, "
                       "fluid-soundfont-gm)", midi.name, soundfont)
        return False
    wav.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "-ni", "-q", "-F", str(wav), "-r", str(sample_rate_hz), str(soundfont), str(midi)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wav.is_file() or wav.stat().st_size <= 44:
        raise RuntimeError(f"fluidsynth failed to render {midi.name}: {proc.stderr.strip()[:300]}")
    return True
