"""Evaluation of registered models: their metrics recomputed on any labelled set, and the ASR beam decoder.

In: a model ref (``REGISTRY:NAME@VERSION|ALIAS``), a labelled set (LABELS_V1, plus the featurized audio for
classify and asr), optionally a ``BeamDecoder`` built by ``beam_decoder`` from a text file and a word list.
Out: ``{model, split, metrics, transcripts}``. Used by ``audiopipe evaluate`` and by retraining, which
scores the champion and the challenger on one held-out set. No Prefect or Dask imports here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.storage import StorageSpec
from audiopipe.tasks.training import TrainSpec, score_split, targets_for

log = logging.getLogger(__name__)


def beam_decoder(storage: StorageSpec, *, beam_width: int = 8, lm_text_url: str | None = None, lm_order: int = 6,
                 lm_weight: float = 0.3, insertion_bonus: float = 1.5, lexicon_url: str | None = None):
    """A ``BeamDecoder`` whose character LM is fitted on a text file (one sentence per line, through the
    project's text normaliser; lines with characters outside the model vocabulary are skipped) and whose
    lexicon is a word list. (``audiopipe transcribe`` uses the LM stored with the model instead.)

    Raises:
        ConfigError: a file cannot be read, or holds no usable sentence or word.
    """
    from audiopipe.models.asr_ctc import DEFAULT_VOCAB, BeamDecoder, CharNgramLM, Lexicon
    from audiopipe.tasks.train_lm import read_lm_sentences

    lm = lexicon = None
    if lm_text_url:
        sentences = read_lm_sentences(lm_text_url, storage, DEFAULT_VOCAB)
        lm = CharNgramLM.fit(sentences, order=lm_order)
        log.info("char %d-gram LM fitted on %d sentences of %s", lm_order, len(sentences), lm_text_url)
    if lexicon_url:
        words = {w for line in read_lm_sentences(lexicon_url, storage, DEFAULT_VOCAB) for w in line.split(" ")}
        lexicon = Lexicon(words)
    return BeamDecoder(beam_width=beam_width, lm=lm, lm_weight=lm_weight, insertion_bonus=insertion_bonus,
                       lexicon=lexicon)


def evaluate_registered(model_ref: str, features_url: str | None, labels_url: str, storage: StorageSpec, *,
                        split: str = "test", cache_dir: str = ".audiopipe/models", batch_size: int = 16,
                        decoder=None) -> dict:
    """Recompute a registered model's metrics on any labelled set -> ``{model, split, metrics, transcripts}``.

    classify/asr read the featurized set at ``features_url``: the card's classes (or vocabulary) and feature
    config hash decide how labels and shards are read; the model carries its own normalisation statistics.
    music and separate read only ``labels_url`` (scores, or mixtures and their stems; ``features_url`` is
    ignored) through ``evaluate_music`` and ``evaluate_separated``; their ``transcripts`` are empty.
    ``decoder`` (asr only) replaces greedy decoding, e.g. ``models.asr_ctc.BeamDecoder``.

    Raises:
        ConfigError: an unknown family, classify/asr without ``features_url``, labels with classes the model
            lacks, or a split the labels do not have (music, separate).
    """
    from audiopipe.models.data import open_shard_set
    from audiopipe.models.registry import open_model_ref

    registry, ref = open_model_ref(model_ref, storage)
    family = registry.get_card(ref).model_family  # fail on a missing --data before fetching the model
    if decoder is not None and family != "asr":
        raise ConfigError(f"a beam-search decoder applies to asr models; {ref} is {family!r}.")
    if family in ("classify", "asr") and not features_url:
        raise ConfigError(f"{ref} is a {family} model: evaluating it needs the featurized labelled set "
                          "(--data, the featurize output root with the model's feature config) as well as its "
                          "labels. Only music and separate models evaluate from the labels alone.")
    model, card = registry.load(ref, Path(cache_dir))
    if card.model_family in ("music", "separate"):  # they read scores or audio named by the labels, no shards
        from audiopipe.tasks.train_music import evaluate_music
        from audiopipe.tasks.train_separation import evaluate_separated

        evaluate = evaluate_music if card.model_family == "music" else evaluate_separated
        metrics = evaluate(model, card, labels_url, storage, split)
        return {"model": str(ref), "split": split, "metrics": metrics, "transcripts": []}
    if card.model_family not in ("classify", "asr"):
        raise ConfigError(f"evaluate supports classify, asr, music and separate models, "
                          f"not {card.model_family!r}.")
    shards = open_shard_set(features_url, card.feature_config_hash, labels_url, storage)
    spec = TrainSpec(card.model_family, features_url, labels_url, registry.url, card.feature_config_hash,
                     batch_size=batch_size)
    target, target_spec, found = targets_for(spec, shards.labels)
    known = list(card.classes) if card.model_family == "classify" else card.vocabulary
    if card.model_family == "classify":
        unknown = set(found) - set(known)
        if unknown:
            raise ConfigError(f"labels have classes {sorted(unknown)} that {ref} was not trained on.")
        index = {c: i for i, c in enumerate(known)}
        target = lambda row: np.int32(index[row["label"]])  # noqa: E731 - the card's class order
    from audiopipe.models.data import iter_examples, to_dataset

    test = to_dataset(lambda: iter_examples(shards, split, target), shards.num_bins, batch_size=batch_size,
                      target_spec=target_spec)
    metrics, extras = score_split(spec, model, {"test": test}, known, decoder)
    return {"model": str(ref), "split": split, "metrics": metrics, "transcripts": extras.get("transcripts", [])}
