"""Models: CTC decoding — greedy best path, and prefix beam search fused with a character n-gram LM.

In: per-frame scores of one or more utterances, ``(frames, len(vocab) + 1)`` (logits or log-probabilities),
blank at index 0, character ``vocab[i - 1]`` at index ``i``. Out: texts, or for one utterance the chosen
label ids with the frame each was emitted at (``beam_search``), from which ``models.ctc_align`` makes timed
words. Pure numpy: nothing here imports Keras, so the same code runs on inference workers, in the flow
process and in benchmarks.

The beam search is vectorised over the beam: per frame a few array operations score every (prefix,
character) extension at once, instead of a Python loop per pair (``_reference_search``, kept as the
specification the tests compare against and for lexicon-constrained decoding). It expands only the
``max_candidates`` most probable characters of a frame, and on frames where the blank holds at least
``BLANK_SKIP`` of the probability it only carries the beam forward. The LM's scores for a context are
computed once per context (``CharNgramLM.row``).
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from audiopipe.infra.errors import ConfigError

DEFAULT_VOCAB = " 'abcdefghijklmnopqrstuvwxyz"
BLANK = 0
# A character this much less likely than the frame's best is not expanded by the beam search.
PRUNE_LOGP = math.log(1e-3)
# Frames whose blank probability is at least this extend no prefix (an extension would carry < 0.1%).
BLANK_SKIP = 0.999
# Characters expanded per frame, at most (the most probable ones).
MAX_CANDIDATES = 8
_BOS, _EOS = "\x02", "\x03"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``(..., classes)`` -> natural-log probabilities, float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def decode_ids(ids: Iterable[int], *, vocab: str = DEFAULT_VOCAB) -> str:
    """Label ids -> text; blanks (0) and the -1 padding of ``keras.ops.ctc_decode`` are skipped.

    Repeats are kept: this is not CTC collapsing (``greedy_decode`` does that).
    """
    return "".join(vocab[i - 1] for i in ids if i > BLANK)


def greedy_decode(logits: np.ndarray, lengths: np.ndarray, *, vocab: str = DEFAULT_VOCAB) -> list[str]:
    """Best path: argmax per frame up to each row's length, merge repeats, drop blanks.

    Args:
        logits: ``(batch, frames, len(vocab) + 1)`` (logits or probabilities, argmax is the same).
        lengths: int ``(batch,)`` in output frames.
    """
    best = np.asarray(logits).argmax(axis=-1)
    texts = []
    for row, length in zip(best, np.asarray(lengths)):
        path = row[:int(length)]
        keep = np.ones(len(path), dtype=bool)
        keep[1:] = path[1:] != path[:-1]
        texts.append(decode_ids(path[keep], vocab=vocab))
    return texts


class CharNgramLM:
    """Character n-gram language model with add-k smoothing over ``vocab`` plus an end-of-sentence event.

    ``P(c | h) = (count(h, c) + k) / (count(h) + k * (len(vocab) + 1))`` with ``h`` the previous
    ``order - 1`` characters (sentence start padded). Built with ``fit``; ``to_bytes``/``from_bytes``
    (gzipped JSON of ``to_dict``) are the file stored beside a model in the registry.
    """

    EOS = _EOS

    def __init__(self, *, order: int, k: float, vocab: str, counts: dict[str, dict[str, int]]):
        if order < 1 or k <= 0:
            raise ConfigError(f"CharNgramLM needs order >= 1 and k > 0, got order={order}, k={k}")
        self.order, self.k, self.vocab, self.counts = order, float(k), vocab, counts
        num_events = len(vocab) + 1
        self._uniform = -math.log(num_events)
        self._table: dict[str, tuple[dict[str, float], float]] = {}
        for context, nexts in counts.items():
            denom = math.log(sum(nexts.values()) + self.k * num_events)
            self._table[context] = ({c: math.log(n + self.k) - denom for c, n in nexts.items()},
                                    math.log(self.k) - denom)
        self._rows: dict[str, np.ndarray] = {}

    @classmethod
    def fit(cls, texts: Iterable[str], *, order: int = 4, k: float = 0.05,
            vocab: str = DEFAULT_VOCAB) -> CharNgramLM:
        """Count n-grams over ``texts`` (each one sentence, characters from ``vocab``).

        Raises:
            ConfigError: a text holds a character outside ``vocab``.
        """
        allowed = set(vocab)
        counts: dict[str, dict[str, int]] = {}
        for text in texts:
            if not set(text) <= allowed:
                raise ConfigError(f"LM text {text[:60]!r} has characters {sorted(set(text) - allowed)} outside "
                                  f"the vocabulary {vocab!r}")
            padded = _BOS * (order - 1) + text + _EOS
            for i in range(order - 1, len(padded)):
                nexts = counts.setdefault(padded[i - order + 1:i], {})
                nexts[padded[i]] = nexts.get(padded[i], 0) + 1
        return cls(order=order, k=k, vocab=vocab, counts=counts)

    def history(self, context: str) -> str:
        """The part of ``context`` the model conditions on: its last ``order - 1`` characters, start-padded."""
        return (_BOS * (self.order - 1) + context)[-(self.order - 1):] if self.order > 1 else ""

    def log_prob(self, context: str, char: str) -> float:
        """Natural-log ``P(char | context)``; ``char`` may be ``CharNgramLM.EOS`` for the sentence end."""
        entry = self._table.get(self.history(context))
        if entry is None:
            return self._uniform
        return entry[0].get(char, entry[1])

    def row(self, history: str) -> np.ndarray:
        """``log P(. | history)`` as float64 ``(len(vocab) + 2,)``: index 0 unused (the CTC blank), ``i`` the
        character ``vocab[i - 1]``, the last the sentence end. Do not modify it: rows are cached, one per
        history the LM has counts for (so the cache is bounded by the LM's size), one shared for the rest."""
        cached = self._rows.get(history)
        if cached is None:
            entry = self._table.get(history)
            if entry is None:
                history = _EOS  # never a history: the key of the shared uniform row
                cached = self._rows.get(history)
                if cached is not None:
                    return cached
                cached = np.full(len(self.vocab) + 2, self._uniform)
            else:
                seen, unseen = entry
                cached = np.array([0.0] + [seen.get(c, unseen) for c in self.vocab] + [seen.get(_EOS, unseen)])
            cached[0] = 0.0
            self._rows[history] = cached
        return cached

    def score(self, text: str) -> float:
        """Natural-log probability of the whole sentence, end included."""
        return sum(self.log_prob(text[:i], ch) for i, ch in enumerate(text + _EOS))

    def to_dict(self) -> dict:
        return {"order": self.order, "k": self.k, "vocab": self.vocab, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: dict) -> CharNgramLM:
        return cls(**data)

    def to_bytes(self) -> bytes:
        """Gzipped JSON (deterministic: same counts, same bytes, so the registry checksum is stable)."""
        body = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return gzip.compress(body, mtime=0)

    @classmethod
    def from_bytes(cls, data: bytes) -> CharNgramLM:
        """Raises ConfigError if ``data`` is not a stored LM."""
        try:
            return cls.from_dict(json.loads(gzip.decompress(data)))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"not a stored character LM: {exc}") from exc


class Lexicon:
    """Allowed words for beam search: every word the output contains must be one of them."""

    def __init__(self, words: Iterable[str]):
        self.words = frozenset(w for w in words if w)
        self.prefixes = frozenset(w[:i] for w in self.words for i in range(len(w) + 1))

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Lexicon:
        return cls(word for text in texts for word in text.split(" "))


@dataclass(frozen=True)
class BeamDecoder:
    """A configured prefix beam search: call it like ``greedy_decode`` (logits, lengths) -> texts.

    The defaults are the setting ``benchmarks/quality.py`` chose on validation speech for its best model
    (see docs/benchmarks.md: char 6-gram LM fitted on the text source's training sentences, weight 0.3,
    insertion bonus 1.5, no lexicon). Training tunes weight and bonus on its validation split and records
    them on the model card (``tasks.train_lm``).
    """

    beam_width: int = 8
    lm: CharNgramLM | None = None
    lm_weight: float = 0.3
    insertion_bonus: float = 1.5
    lexicon: Lexicon | None = None
    vocab: str = DEFAULT_VOCAB

    def __call__(self, logits: np.ndarray, lengths: np.ndarray) -> list[str]:
        return beam_search_decode(logits, lengths, beam_width=self.beam_width, vocab=self.vocab, lm=self.lm,
                                  lm_weight=self.lm_weight, insertion_bonus=self.insertion_bonus,
                                  lexicon=self.lexicon)

    def search(self, log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One utterance's log-probabilities ``(frames, classes)`` -> (label ids, emission frames)."""
        return beam_search(log_probs, beam_width=self.beam_width, vocab=self.vocab, lm=self.lm,
                           lm_weight=self.lm_weight, insertion_bonus=self.insertion_bonus, lexicon=self.lexicon)

    def describe(self) -> str:
        lm = f"char {self.lm.order}-gram LM x{self.lm_weight}" if self.lm else "no LM"
        return (f"beam {self.beam_width}, {lm}, insertion bonus {self.insertion_bonus}, "
                f"{f'lexicon of {len(self.lexicon.words)} words' if self.lexicon else 'no lexicon'}")


def beam_search_decode(logits: np.ndarray, lengths: np.ndarray, *, beam_width: int = 16,
                       vocab: str = DEFAULT_VOCAB, lm: CharNgramLM | None = None, lm_weight: float = 0.5,
                       insertion_bonus: float = 0.0, lexicon: Lexicon | None = None) -> list[str]:
    """CTC prefix beam search with shallow fusion of a character LM and an optional lexicon.

    A prefix scores ``log P_ctc(prefix) + lm_weight * log P_lm(prefix) + insertion_bonus * len(prefix)``;
    the bonus offsets the LM's pull towards short outputs. With a lexicon, a partial word must be the
    prefix of a lexicon word and every completed word must be one.

    Args:
        logits: float ``(batch, frames, len(vocab) + 1)`` unnormalised, blank at 0.
        lengths: int ``(batch,)`` in output frames.
        beam_width: Prefixes kept after each frame.

    Returns:
        The best text per row.
    """
    log_probs = log_softmax(logits)
    return [decode_ids(beam_search(lp[:int(n)], beam_width=beam_width, vocab=vocab, lm=lm, lm_weight=lm_weight,
                                   insertion_bonus=insertion_bonus, lexicon=lexicon)[0], vocab=vocab)
            for lp, n in zip(log_probs, np.asarray(lengths))]


def beam_search(log_probs: np.ndarray, *, beam_width: int, vocab: str = DEFAULT_VOCAB, lm: CharNgramLM | None = None,
                lm_weight: float = 0.5, insertion_bonus: float = 0.0, lexicon: Lexicon | None = None,
                max_candidates: int = MAX_CANDIDATES, blank_skip: float | None = BLANK_SKIP
                ) -> tuple[np.ndarray, np.ndarray]:
    """Prefix beam search over one utterance -> (int64 label ids ``1..len(vocab)``, int64 emission frames).

    A label's emission frame is the frame at which its prefix first entered the beam (strictly increasing
    along the result; ``ctc_align.refine_emissions`` moves each to its label's peak). ``max_candidates=None``
    and ``blank_skip=None`` search exactly like ``_reference_search`` (the slow specification), which also
    serves lexicon-constrained decoding.

    Raises:
        ConfigError: ``beam_width`` < 1.
    """
    if beam_width < 1:
        raise ConfigError(f"beam_width must be >= 1, got {beam_width}")
    if lm is not None and lm.vocab != vocab:
        raise ConfigError(f"the LM's vocabulary {lm.vocab!r} is not the model's {vocab!r}")
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if lexicon is not None:
        text = _reference_search(log_probs, beam_width=beam_width, vocab=vocab, lm=lm, lm_weight=lm_weight,
                                 bonus=insertion_bonus, lexicon=lexicon)
        ids = np.array([vocab.index(ch) + 1 for ch in text], dtype=np.int64)
        return ids, _first_frames(log_probs, ids)
    return _BeamSearch(log_probs, beam_width, vocab, lm, lm_weight, insertion_bonus,
                       max_candidates, blank_skip).run()


class _BeamSearch:
    """The vectorised search. Prefixes are interned as trie nodes (``children``), so one string is one node;
    the beam is arrays over its nodes: log P(prefix, ending in blank), log P(prefix, ending in a label)."""

    def __init__(self, log_probs, beam_width, vocab, lm, lm_weight, bonus, max_candidates, blank_skip):
        self.lp, self.width, self.vocab, self.lm = log_probs, beam_width, vocab, lm
        self.weight, self.bonus = float(lm_weight), float(bonus)
        num_classes = log_probs.shape[1]
        # per node: parent, last label, emission frame, LM+bonus score so far, LM history and its row id
        self.parent, self.label, self.frame, self.extra = [-1], [0], [-1], [0.0]
        self.hist = [lm.history("") if lm else ""]
        self.children: dict[tuple[int, int], int] = {}
        # one row per LM history: LM-weighted log P(label | history) + bonus per class (index 0 unused,
        # the last column the sentence end); without an LM one row holds the bonus alone
        self.table = np.zeros((64, num_classes + 1))
        self.row_of: dict[str, int] = {}
        self.row_id = [self._row_id(self.hist[0])]
        k = num_classes - 1 if max_candidates is None else min(max_candidates, num_classes - 1)
        order = np.argsort(-log_probs[:, 1:], axis=1, kind="stable")[:, :k] + 1
        keep = np.take_along_axis(log_probs, order, axis=1) >= log_probs.max(axis=1, keepdims=True) + PRUNE_LOGP
        self.cands, self.keep = order, keep
        self.skip = (log_probs[:, BLANK] >= math.log(blank_skip)) if blank_skip else np.zeros(len(log_probs), bool)

    def _row_id(self, history: str) -> int:
        rid = self.row_of.get(history)
        if rid is None:
            rid = len(self.row_of)
            if rid == len(self.table):
                self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            row = self.weight * self.lm.row(history) if self.lm else np.zeros(self.table.shape[1])
            row[1:-1] += self.bonus
            self.table[rid] = row
            self.row_of[history] = rid
        return rid

    def _child(self, node: int, label: int, t: int) -> int:
        key = (node, label)
        child = self.children.get(key)
        if child is None:
            child = len(self.parent)
            self.children[key] = child
            self.parent.append(node)
            self.label.append(label)
            self.frame.append(t)
            self.extra.append(self.extra[node] + float(self.table[self.row_id[node], label]))
            history = self.lm.history(self.hist[node] + self.vocab[label - 1]) if self.lm else ""
            self.hist.append(history)
            self.row_id.append(self._row_id(history))
        return child

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        neg = -np.inf
        nodes = [0]
        pb, pnb = np.array([0.0]), np.array([neg])
        last, last_list, parents, extra = np.array([0]), [0], [-1], np.array([0.0])
        rows = self.table[[0]]
        for t, frame in enumerate(self.lp):
            total = np.logaddexp(pb, pnb)
            stay_pb = total + frame[BLANK]
            stay_pnb = np.where(last > 0, pnb + frame[last], neg)
            cands = self.cands[t][self.keep[t]]
            if self.skip[t] or not len(cands):
                pb, pnb = stay_pb, stay_pnb
                continue
            # extension (i, c): from any path of prefix i, except that repeating its last label needs a blank
            ext = np.where(cands[None, :] == last[:, None], pb[:, None], total[:, None]) + frame[cands][None, :]
            # an extension that is already in the beam (its parent in the beam + its label) merges into it
            position = {x: i for i, x in enumerate(nodes)}
            labels = cands.tolist()
            for j, parent in enumerate(parents):
                i = position.get(parent)
                if i is not None and last_list[j] in labels:
                    kk = labels.index(last_list[j])
                    stay_pnb[j] = np.logaddexp(stay_pnb[j], ext[i, kk])
                    ext[i, kk] = neg
            stay_score = np.logaddexp(stay_pb, stay_pnb) + extra
            ext_score = ext + extra[:, None] + rows[:, cands]
            scores = np.concatenate([stay_score, ext_score.ravel()])
            best = np.argsort(-scores, kind="stable")[:self.width]
            best = best[np.isfinite(scores[best])]
            n = len(nodes)
            new_nodes = [nodes[b] if b < n else self._child(nodes[(b - n) // len(cands)],
                                                           int(cands[(b - n) % len(cands)]), t)
                         for b in best.tolist()]
            stay = best < n
            from_ext = np.where(stay, 0, best - n)
            pb = np.where(stay, stay_pb[np.minimum(best, n - 1)], neg)
            pnb = np.where(stay, stay_pnb[np.minimum(best, n - 1)], ext.ravel()[from_ext])
            nodes = new_nodes
            last_list = [self.label[x] for x in nodes]
            last = np.array(last_list)
            parents = [self.parent[x] for x in nodes]
            extra = np.array([self.extra[x] for x in nodes])
            rows = self.table[[self.row_id[x] for x in nodes]]
        return self._best(np.asarray(nodes), pb, pnb)

    def _best(self, nodes, pb, pnb) -> tuple[np.ndarray, np.ndarray]:
        end = self.table[[self.row_id[n] for n in nodes], -1] if self.lm else np.zeros(len(nodes))
        extra = np.array([self.extra[n] for n in nodes])
        node = int(nodes[int(np.argmax(np.logaddexp(pb, pnb) + extra + end))])
        ids, frames = [], []
        while node > 0:
            ids.append(self.label[node])
            frames.append(self.frame[node])
            node = self.parent[node]
        return np.array(ids[::-1], dtype=np.int64), np.array(frames[::-1], dtype=np.int64)


def _first_frames(log_probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Emission frames for a given label sequence: each label at its most probable frame after the previous
    one's (a cheap monotonic alignment, used only for lexicon-constrained results)."""
    frames, t = [], 0
    for k, label in enumerate(ids):
        stop = len(log_probs) - (len(ids) - k - 1)
        t = t + int(np.argmax(log_probs[t:max(t + 1, stop), label])) if t < len(log_probs) else len(log_probs) - 1
        frames.append(t)
        t = min(t + 1, len(log_probs) - 1)
    return np.array(frames, dtype=np.int64)


def _allowed(prefix: str, lexicon: Lexicon | None, *, final: bool = False) -> bool:
    if lexicon is None:
        return True
    words = prefix.split(" ")
    if any(w not in lexicon.words for w in words[:-1]):
        return False
    return words[-1] in lexicon.words or (words[-1] == "" and prefix == "") if final \
        else words[-1] in lexicon.prefixes


def _logadd(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a if b == -math.inf else a + math.log1p(math.exp(b - a))


def _reference_search(log_probs: np.ndarray, *, beam_width: int, vocab: str, lm: CharNgramLM | None,
                      lm_weight: float, bonus: float, lexicon: Lexicon | None) -> str:
    """Prefix beam search one prefix and one character at a time: the specification of ``_BeamSearch``."""
    neg_inf = -math.inf
    beams: dict[str, tuple[float, float]] = {"": (0.0, neg_inf)}  # prefix -> (log p ending blank, non-blank)
    extra: dict[str, float] = {"": 0.0}  # prefix -> LM and insertion score
    for frame_np in log_probs:
        candidates = [int(c) for c in np.flatnonzero(frame_np >= frame_np.max() + PRUNE_LOGP) if c != BLANK]
        frame = frame_np.tolist()  # Python floats: scalar math on numpy scalars is several times slower
        nxt: dict[str, list[float]] = {}
        for prefix, (p_b, p_nb) in beams.items():
            total = _logadd(p_b, p_nb)
            entry = nxt.setdefault(prefix, [neg_inf, neg_inf])
            entry[0] = _logadd(entry[0], total + frame[BLANK])
            if prefix:  # its last label again, without a blank between: the same prefix
                entry[1] = _logadd(entry[1], p_nb + frame[vocab.index(prefix[-1]) + 1])
            for c in candidates:
                ch, p = vocab[c - 1], frame[c]
                if prefix and prefix[-1] == ch:  # a repeat needs a blank between to make a new label
                    from_score = p_b + p
                else:
                    from_score = total + p
                new = prefix + ch
                if new not in extra:
                    if not _allowed(new, lexicon):
                        continue
                    extra[new] = extra[prefix] + bonus + (lm_weight * lm.log_prob(prefix, ch) if lm else 0.0)
                new_entry = nxt.setdefault(new, [neg_inf, neg_inf])
                new_entry[1] = _logadd(new_entry[1], from_score)
        ranked = sorted(nxt.items(), key=lambda kv: _logadd(*kv[1]) + extra[kv[0]], reverse=True)
        beams = {prefix: (pb, pnb) for prefix, (pb, pnb) in ranked[:beam_width]}

    def final_score(prefix: str) -> float:
        end = lm_weight * lm.log_prob(prefix, _EOS) if lm else 0.0
        return _logadd(*beams[prefix]) + extra[prefix] + end

    finished = [p for p in beams if _allowed(p, lexicon, final=True)] or list(beams)
    return max(finished, key=final_score)
