"""Flow: ``audiopipe generate music MODEL_REF OUT_URL`` — a registered note model -> a MIDI file and its WAV.

In: a music model ref (``REGISTRY_URL:NAME@SELECTOR``, or ``NAME@SELECTOR`` with ``registry_url``), an output
URL, a length, a temperature and a seed. Out: ``OUT_URL/<name>-v<version>-seed<seed>.mid`` and, when the
``fluidsynth`` executable and ``/usr/share/sounds/sf2/FluidR3_GM.sf2`` are installed, the same name ``.wav``
(16 kHz stereo); otherwise a log line says why there is no WAV.

The model is fetched and checksum-verified by the registry and loaded in Keras safe mode; its card's
``vocabulary`` (``MusicVocab.to_strings``) maps the sampled tokens back to MIDI pitches and quarter notes.
A plain function: sampling a few hundred notes takes seconds, no Prefect run or Dask cluster is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.storage import merged_storage_spec
from audiopipe.tasks.train_music import MusicVocab, generate_notes, save_midi_and_wav

logger = logging.getLogger(__name__)

MAX_NOTES = 10_000


def generate_music(model_ref: str, out_url: str, *, length: int = 128, temperature: float = 1.0, seed: int = 0,
                   registry_url: str | None = None, storage_options: dict[str, Any] | None = None,
                   primer: Sequence[tuple[int, float]] = (), cache_dir: str = ".audiopipe/models") -> dict:
    """Sample a melody from a registered music model and publish it as MIDI (and WAV when possible).

    Args:
        model_ref: ``REGISTRY_URL:NAME@VERSION|ALIAS|latest`` (or without ``REGISTRY_URL:`` if ``registry_url``).
        out_url: Folder for the files, any fsspec URL or local path.
        length: Notes to generate, 1 .. ``MAX_NOTES``.
        temperature: Softmax temperature, > 0 (below 1: safer, above 1: wilder).
        seed: Seed of the sampling; the same model, arguments and seed give the same notes.
        registry_url: The registry when ``model_ref`` names none.
        storage_options: fsspec/s3fs options (endpoint, keys), as ``--storage-options``.
        primer: Optional ``(midi_pitch, quarter_length)`` notes to continue (mapped to the nearest tokens);
            they open the MIDI file, followed by the ``length`` new notes. Empty: start from BOS.
        cache_dir: Local cache of verified model files.

    Returns:
        ``{"model_ref", "midi_url", "wav_url" (None when not rendered), "num_notes", "pitches",
        "durations_ql", "seconds"}``.

    Raises:
        ConfigError: bad arguments (before anything is loaded), or a model that is not a music model.
        RegistryError / IntegrityError: unknown ref, or a model file that fails its checksum.
    """
    from audiopipe.models.registry import open_model_ref

    if not 1 <= length <= MAX_NOTES:
        raise ConfigError(f"--length must be between 1 and {MAX_NOTES}, got {length}")
    if not temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {temperature}")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    started = time.monotonic()
    storage = merged_storage_spec(storage_options)
    registry, ref = open_model_ref(model_ref, storage, default_registry=registry_url)
    card = registry.get_card(ref)
    if card.model_family != "music":
        raise ConfigError(f"{ref} is a {card.model_family!r} model; `generate music` needs a music model.")
    model, card = registry.load(ref, Path(cache_dir))
    vocab = MusicVocab.from_strings(card.vocabulary)
    pitches, durations = generate_notes(model, vocab, length=length, temperature=temperature, seed=seed,
                                        primer=primer)
    urls = save_midi_and_wav(pitches, durations, out_url, f"{ref.name}-v{ref.version}-seed{seed}", storage)
    if urls["wav_url"] is None:
        logger.info("generate: no WAV rendering (fluidsynth or the FluidR3_GM SoundFont is missing)")
    seconds = round(time.monotonic() - started, 3)
    logger.info("generate: %d notes from %s in %.1f s -> %s", len(pitches), ref, seconds, urls["midi_url"])
    return {"model_ref": str(ref), **urls, "num_notes": len(pitches), "pitches": pitches,
            "durations_ql": durations, "seconds": seconds}


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    # python -m audiopipe.flows.generate REGISTRY_URL:music@latest /tmp/audiopipe-generated
    logger.info("%s", generate_music(sys.argv[1], sys.argv[2], length=64, temperature=1.0, seed=0))
