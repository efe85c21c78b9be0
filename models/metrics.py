"""Models: speech recognition error rates, computed with jiwer.

In: reference and hypothesis transcripts (lists of strings, same order). Out: corpus-level character and
word error rates (total edits / total reference length, as jiwer computes them, not a mean of per-clip
rates), and per-clip edit chunks for reports that highlight errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jiwer

from audiopipe.infra.errors import ConfigError


@dataclass(frozen=True)
class EditChunk:
    """One aligned stretch: ``kind`` is ``equal``, ``substitute``, ``delete`` or ``insert``."""

    kind: str
    reference: str
    hypothesis: str


def _check(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str]]:
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ConfigError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ConfigError("no transcripts to score")
    if not any(r.strip() for r in references):
        raise ConfigError("every reference transcript is empty; an error rate is undefined")
    return references, hypotheses


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Character error rate over the corpus: (S + D + I) / reference characters (spaces count).

    Raises:
        ConfigError: If the lists differ in length, are empty, or every reference is empty.
    """
    references, hypotheses = _check(references, hypotheses)
    return float(jiwer.cer(references, hypotheses))


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Word error rate over the corpus: (S + D + I) / reference words.

    Raises:
        ConfigError: If the lists differ in length, are empty, or every reference is empty.
    """
    references, hypotheses = _check(references, hypotheses)
    return float(jiwer.wer(references, hypotheses))


def char_alignment(reference: str, hypothesis: str) -> list[EditChunk]:
    """Character-level alignment of one transcript pair, for highlighting errors in a report."""
    out = jiwer.process_characters(reference, hypothesis)
    ref, hyp = out.references[0], out.hypotheses[0]
    return [EditChunk(chunk.type, "".join(ref[chunk.ref_start_idx:chunk.ref_end_idx]),
                      "".join(hyp[chunk.hyp_start_idx:chunk.hyp_end_idx]))
            for chunk in out.alignments[0]]
