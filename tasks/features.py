"""Stage 2 of featurize: mono float32 audio at the target rate -> log-mel or MFCC frames.

In: one segment's samples. Out: float32 ``(num_frames, num_bins)``, exactly what librosa computes:
``power_to_db(melspectrogram(y, sr, n_fft, hop_length, n_mels), ref=1.0, amin=1e-10, top_db=None)``
for log-mel, and ``librosa.feature.mfcc(S=<that log-mel>, n_mfcc)`` for MFCC. The config's hash names
the output partition, so two configs never mix rows. ``finite_features`` is what the pipeline stores: the
same values, refused (``BadAudioError``) when any is NaN or Inf, never scaled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import librosa
import numpy as np

from audiopipe.infra.errors import BadAudioError, ConfigError

FEATURE_KINDS = ("logmel", "mfcc")


@dataclass(frozen=True)
class FeatureConfig:
    """What a feature row means. Every field goes into ``config_hash``.

    Attributes:
        kind: ``logmel`` or ``mfcc``.
        sample_rate: Rate every input is resampled to (soxr HQ), Hz.
        n_fft: FFT size in samples (400 = 25 ms at 16 kHz, the usual speech window).
        hop_length: Hop in samples (160 = 10 ms at 16 kHz, 100 frames a second).
        n_mels: Mel bands.
        n_mfcc: Cepstral coefficients kept (``kind="mfcc"`` only).
        segment_seconds: Long recordings are cut into segments this long, featurized independently.
    """

    kind: str = "logmel"
    sample_rate: int = 16_000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 80
    n_mfcc: int = 40
    segment_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ConfigError(f"unknown feature kind {self.kind!r}; choose one of {', '.join(FEATURE_KINDS)}.")
        checks = [
            (1_000 <= self.sample_rate <= 384_000, "sample_rate must be between 1000 and 384000 Hz"),
            (16 <= self.n_fft <= 65_536, "n_fft must be between 16 and 65536 samples"),
            (1 <= self.hop_length <= self.n_fft, "hop_length must be between 1 and n_fft"),
            (1 <= self.n_mels <= self.n_fft // 2 + 1, "n_mels must be between 1 and n_fft/2+1"),
            (self.kind != "mfcc" or 1 <= self.n_mfcc <= self.n_mels, "n_mfcc must be between 1 and n_mels"),
            (0.5 <= self.segment_seconds <= 3_600, "segment_seconds must be between 0.5 and 3600"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid feature config: {message} (got {self.to_dict()}).")

    @property
    def num_bins(self) -> int:
        """Coefficients per frame."""
        return self.n_mels if self.kind == "logmel" else self.n_mfcc

    @property
    def config_hash(self) -> str:
        """12 hex chars of sha256 over the canonical JSON of the fields (``n_mfcc`` ignored for logmel)."""
        data = self.to_dict()
        if self.kind == "logmel":
            data.pop("n_mfcc")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown feature config keys {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**data)


def num_frames_for(num_samples: int, *, cfg: FeatureConfig) -> int:
    """Frames librosa yields for ``num_samples`` with ``center=True``: ``1 + num_samples // hop``."""
    return 1 + num_samples // cfg.hop_length


def log_mel(samples: np.ndarray, *, cfg: FeatureConfig) -> np.ndarray:
    """Log-mel spectrogram in dB, exactly as librosa computes it.

    Args:
        samples: Mono float32 ``(num_samples,)`` at ``cfg.sample_rate``.
        cfg: Feature config.

    Returns:
        float32 ``(num_frames, n_mels)``, C-contiguous.
    """
    mel = librosa.feature.melspectrogram(
        y=samples, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels
    )
    db = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    return np.ascontiguousarray(db.T, dtype=np.float32)


def mfcc(samples: np.ndarray, *, cfg: FeatureConfig) -> np.ndarray:
    """MFCC from the same log-mel: ``librosa.feature.mfcc(S=log_mel, n_mfcc)``.

    Returns:
        float32 ``(num_frames, n_mfcc)``, C-contiguous.
    """
    db = log_mel(samples, cfg=cfg).T
    coeffs = librosa.feature.mfcc(S=db, n_mfcc=cfg.n_mfcc)
    return np.ascontiguousarray(coeffs.T, dtype=np.float32)


def compute_features(samples: np.ndarray, *, cfg: FeatureConfig) -> np.ndarray:
    """Dispatch on ``cfg.kind``; returns float32 ``(num_frames, cfg.num_bins)``."""
    return log_mel(samples, cfg=cfg) if cfg.kind == "logmel" else mfcc(samples, cfg=cfg)


def finite_features(samples: np.ndarray, *, cfg: FeatureConfig) -> np.ndarray:
    """``compute_features``, refused when any value is NaN or Inf, so such a row is never stored.

    Finite samples can still overflow: the power spectrum is float32, so a float file whose samples peak
    around 1e17 or more (with the default 400-sample window) gives Inf power and NaN dB. The file is rejected
    rather than rescaled: a stored row always means librosa's features of the decoded samples.

    Raises:
        BadAudioError: ``samples far outside [-1, 1]: peak …`` when that caused it, else ``non-finite
            features: …``.
    """
    features = compute_features(samples, cfg=cfg)
    if np.isfinite(features).all():
        return features
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    bad = int(features.size - np.count_nonzero(np.isfinite(features)))
    if peak > 1.0:
        raise BadAudioError(f"samples far outside [-1, 1]: peak {peak:.3g} overflows the float32 power spectrum "
                            f"({bad} of {features.size} {cfg.kind} values NaN or Inf); rescale the file")
    raise BadAudioError(f"non-finite features: {bad} of {features.size} {cfg.kind} values are NaN or Inf "
                        f"although the samples peak at {peak:.3g}")


def padded_batch(frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack (num_frames, bins) arrays into a zero-padded float32 (batch, max_frames, bins) and their lengths."""
    lengths = np.array([f.shape[0] for f in frames], np.int32)
    x = np.zeros((len(frames), int(lengths.max()), frames[0].shape[1]), np.float32)
    for row, f in enumerate(frames):
        x[row, :len(f)] = f
    return x, lengths
