"""Training stage, ASR: the character LM and decoder setting that ship with a recogniser.

In: the trained model, its feature shards and labels (the training split's transcripts, or a text file
the user names with ``--lm-text``) and the validation split. Out: the files and card fields that
``Registry.register`` stores with the model version: ``char_lm.json.gz`` (a ``CharNgramLM``, checksummed
on the card like the model) and ``extra["decoder"]``, the beam width, LM weight and insertion bonus chosen
on validation utterances, with the greedy and beam CERs that chose them. ``audiopipe transcribe`` decodes
with exactly this unless told otherwise. No Prefect or Dask imports here.
"""

from __future__ import annotations

import logging
import time

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.storage import StorageSpec

log = logging.getLogger(__name__)

LM_FILE = "char_lm.json.gz"
LM_ORDER = 6
BEAM_WIDTH = 8
# The grid benchmarks/quality.py searched; its best (0.3, 1.5) is the default when there is no validation set.
LM_WEIGHTS = (0.3, 0.6, 1.0)
INSERTION_BONUSES = (0.5, 1.5, 2.5)
DEFAULT_SETTING = (0.3, 1.5)
VAL_UTTERANCES = 200  # enough to rank 9 settings; decoding them all takes seconds


def read_lm_sentences(url: str, storage: StorageSpec, vocab: str) -> list[str]:
    """A text file, one sentence per line, through the project's text normaliser (numbers, times and
    money as spoken); lines left empty or with characters outside ``vocab`` are skipped.

    Raises:
        ConfigError: the file cannot be read or holds no usable line.
    """
    from audiopipe.infra.storage import open_fs
    from audiopipe.models.text_norm import normalize_text

    fs, path = open_fs(url, storage)
    try:
        text = fs.cat_file(path).decode("utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot read {url}: no such file") from exc
    allowed = set(vocab)
    kept = [normalize_text(line) for line in text.splitlines()]
    kept = [line for line in kept if line and set(line) <= allowed]
    if not kept:
        raise ConfigError(f"{url} has no line that normalises to characters of {vocab!r}: nothing to fit an LM on.")
    return kept


def training_sentences(shards) -> list[str]:
    """The transcripts of the training split (never validation or test: they judge the LM)."""
    return [row["text"] for row in shards.labels.values() if row.get("split") == "train" and row.get("text")]


def fit_decoder(model, shards, val_dataset, vocab: str, *, subsample: int, lm_text_url: str | None,
                storage: StorageSpec) -> tuple[dict[str, bytes], dict]:
    """Fit the LM, choose weight and bonus on validation -> (registry files, card ``extra``).

    Raises:
        ConfigError: ``lm_text_url`` is unreadable or empty, or there is no text to fit on at all.
    """
    from audiopipe.models.ctc_decode import CharNgramLM

    started = time.perf_counter()
    if lm_text_url:
        sentences, source = read_lm_sentences(lm_text_url, storage, vocab), lm_text_url
    else:
        sentences, source = training_sentences(shards), "training-split transcripts"
    if not sentences:
        raise ConfigError("no training transcripts to fit the character LM on; pass --lm-text URL.")
    lm = CharNgramLM.fit(sentences, order=LM_ORDER, vocab=vocab)
    setting, tuning = choose_setting(model, val_dataset, lm, vocab, subsample)
    decoder = {"beam_width": BEAM_WIDTH, "lm_file": LM_FILE, "lm_weight": setting[0], "insertion_bonus": setting[1],
               "lm": {"order": LM_ORDER, "k": lm.k, "source": source, "sentences": len(sentences),
                      "contexts": len(lm.counts)}, **tuning}
    log.info("char %d-gram LM on %d sentences (%s); decoder %s in %.1f s", LM_ORDER, len(sentences), source,
             {k: decoder[k] for k in ("lm_weight", "insertion_bonus")}, time.perf_counter() - started)
    return {LM_FILE: lm.to_bytes()}, {"decoder": decoder}


def choose_setting(model, val_dataset, lm, vocab: str, subsample: int) -> tuple[tuple[float, float], dict]:
    """The (LM weight, insertion bonus) of the grid with the lowest CER on up to ``VAL_UTTERANCES``
    validation utterances, and what was measured; the default setting when there are none."""
    from audiopipe.models.ctc_decode import BeamDecoder, decode_ids, greedy_decode, log_softmax
    from audiopipe.models.layers import output_lengths
    from audiopipe.models.metrics import cer

    logits, refs = [], []
    for x, y in val_dataset:
        out = model.predict(x, verbose=0)
        lengths = output_lengths(x["lengths"].numpy(), subsample)
        logits += [out[i, :n] for i, n in enumerate(lengths)]
        refs += [decode_ids(row[row > 0], vocab=vocab) for row in y.numpy()]
        if len(refs) >= VAL_UTTERANCES:
            break
    logits, refs = logits[:VAL_UTTERANCES], refs[:VAL_UTTERANCES]
    if not refs:
        return DEFAULT_SETTING, {"chosen_on": "defaults (no validation utterances)"}
    greedy = [greedy_decode(lp[None], [len(lp)], vocab=vocab)[0] for lp in logits]
    log_probs = [log_softmax(lp) for lp in logits]
    trials = []
    for weight in LM_WEIGHTS:
        for bonus in INSERTION_BONUSES:
            decoder = BeamDecoder(beam_width=BEAM_WIDTH, lm=lm, lm_weight=weight, insertion_bonus=bonus, vocab=vocab)
            hyps = [decode_ids(decoder.search(lp)[0], vocab=vocab) for lp in log_probs]
            trials.append((float(cer(refs, hyps)), weight, bonus))
    best = min(trials)
    return (best[1], best[2]), {"chosen_on": f"validation split, {len(refs)} utterances",
                                "val_cer_greedy": round(float(cer(refs, greedy)), 4),
                                "val_cer_beam": round(best[0], 4),
                                "grid": [{"lm_weight": w, "insertion_bonus": b, "val_cer": round(c, 4)}
                                         for c, w, b in trials]}

