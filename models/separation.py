"""Models: speech separation by a time-frequency mask on STFT magnitudes (Open-Unmix style), plus its DSP.

Model in: ``magnitude`` float32 ``(batch, frames, n_fft // 2 + 1)`` (mixture STFT magnitude, zero-padded
past each row's length) and ``lengths`` int32 ``(batch,)`` in frames. Model out: ``mask`` float32 in
``[0, 1]`` and ``estimate`` = ``mask * magnitude``, both ``(batch, frames, bins)``. Layout, as Open-Unmix:
log-compression and per-bin normalisation (statistics stored in the model) -> dense + LayerNorm + tanh ->
``lstm_layers`` x BiLSTM -> skip concatenation -> dense + LayerNorm + ReLU -> dense + sigmoid = mask.
LayerNorm replaces Open-Unmix's BatchNorm, whose statistics padded frames would skew. Training fits the
``estimate`` to the clean speech magnitude (signal approximation, MSE); ``mask`` has no loss.

DSP (numpy/librosa, kept apart from the model): ``stft_mag_phase``, ``apply_mask_istft`` (inverse STFT with
the mixture's phase), the oracle ideal ratio mask ``irm``, and SI-SDR through fast-bss-eval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import librosa
import numpy as np
from fast_bss_eval.numpy import si_sdr_loss

from audiopipe.infra.errors import ConfigError
from audiopipe.models.layers import FeatureNormalization, Log1p, SequenceMask, lstm

# fast-bss-eval adds this much regularisation to the power ratio: SI-SDR of a perfect estimate reads 100 dB
# instead of +inf, which keeps means over a test set finite.
SI_SDR_CLAMP_DB = 100.0


@dataclass(frozen=True)
class SeparationConfig:
    """STFT and architecture of the mask estimator.

    Attributes:
        sampling_rate: Audio rate, Hz.
        n_fft: STFT size, samples (512 = 32 ms at 16 kHz).
        hop: STFT hop, samples.
        hidden_units: Width of the dense layers; each BiLSTM direction has half of it.
        lstm_layers: Stacked BiLSTMs.
        dropout: Dropout rate between recurrent layers.
    """

    sampling_rate: int = 16_000
    n_fft: int = 512
    hop: int = 128
    hidden_units: int = 256
    lstm_layers: int = 3
    dropout: float = 0.2

    def __post_init__(self):
        if self.n_fft < 2 or self.hop < 1 or self.hop > self.n_fft:
            raise ConfigError(f"need n_fft >= 2 and 1 <= hop <= n_fft, got n_fft={self.n_fft}, hop={self.hop}")
        if self.sampling_rate < 1 or self.lstm_layers < 1 or self.hidden_units < 2 or self.hidden_units % 2:
            raise ConfigError(f"sampling_rate, lstm_layers >= 1 and an even hidden_units >= 2 needed: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_bins(self) -> int:
        return self.n_fft // 2 + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SeparationConfig:
        return cls(**data)


def build_separation(cfg: SeparationConfig) -> keras.Model:
    """Build the (uncompiled) mask estimator; see the module docstring for inputs and outputs."""
    magnitude = keras.Input((None, cfg.num_bins), name="magnitude")
    lengths = keras.Input((), dtype="int32", name="lengths")
    x = Log1p(name="compress")(magnitude)
    x = FeatureNormalization(cfg.num_bins, name="feature_norm")(x)
    x = keras.layers.Dense(cfg.hidden_units, use_bias=False, name="fc1")(x)
    x = keras.layers.LayerNormalization(name="norm1")(x)
    skip = x = keras.layers.Activation("tanh", name="tanh1")(x)
    mask = SequenceMask(1, name="sequence_mask")([x, lengths])
    for i in range(cfg.lstm_layers):
        if i:
            x = keras.layers.Dropout(cfg.dropout, name=f"dropout{i}")(x)
        x = keras.layers.Bidirectional(lstm(cfg.hidden_units // 2, name=f"lstm{i}"), name=f"bilstm{i}")(x, mask=mask)
    x = keras.layers.Concatenate(name="skip")([skip, x])
    x = keras.layers.Dense(cfg.hidden_units, use_bias=False, name="fc2")(x)
    x = keras.layers.LayerNormalization(name="norm2")(x)
    x = keras.layers.Activation("relu", name="relu2")(x)
    mask_out = keras.layers.Dense(cfg.num_bins, activation="sigmoid", dtype="float32", name="mask")(x)
    estimate = keras.layers.Multiply(dtype="float32", name="estimate")([mask_out, magnitude])
    return keras.Model({"magnitude": magnitude, "lengths": lengths}, {"mask": mask_out, "estimate": estimate},
                       name="separation")


def separation_losses() -> dict[str, keras.losses.Loss]:
    """MSE between the masked mixture and the clean speech magnitude; no loss on the mask itself."""
    return {"estimate": keras.losses.MeanSquaredError(name="magnitude_mse")}


def _stft(signal: np.ndarray, cfg: SeparationConfig) -> np.ndarray:
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 1 or signal.size == 0:
        raise ConfigError(f"expected non-empty mono samples (num_samples,), got shape {signal.shape}")
    return librosa.stft(signal, n_fft=cfg.n_fft, hop_length=cfg.hop, window="hann", center=True).T


def stft_mag_phase(signal: np.ndarray, *, cfg: SeparationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Mono float samples -> float32 magnitude and phase (radians), each ``(frames, n_fft // 2 + 1)``.

    Hann window, centred frames: ``frames = 1 + num_samples // hop``.
    """
    spec = _stft(signal, cfg)
    return np.abs(spec).astype(np.float32), np.angle(spec).astype(np.float32)


def apply_mask_istft(mixture: np.ndarray, mask: np.ndarray, *, cfg: SeparationConfig) -> np.ndarray:
    """Mask the mixture's STFT (keeping its phase) and invert it.

    Args:
        mixture: float ``(num_samples,)``.
        mask: float ``(frames, bins)`` as from ``stft_mag_phase`` of this mixture (extra padded frames
            from a batch are cut off).

    Returns:
        float32 ``(num_samples,)``, the same length as the mixture.
    """
    spec = _stft(mixture, cfg)
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[1] != spec.shape[1] or mask.shape[0] < spec.shape[0]:
        raise ConfigError(f"mask {mask.shape} does not cover the mixture's STFT {spec.shape}")
    masked = spec * mask[:spec.shape[0]]
    return librosa.istft(masked.T, hop_length=cfg.hop, window="hann", center=True,
                         length=len(mixture)).astype(np.float32)


def irm(speech: np.ndarray, background: np.ndarray, *, cfg: SeparationConfig) -> np.ndarray:
    """Ideal ratio mask ``sqrt(|S|^2 / (|S|^2 + |N|^2))`` of speech in ``speech + background``.

    Returns:
        float32 ``(frames, bins)`` in ``[0, 1]``; 0 where both stems are silent.
    """
    if np.shape(speech) != np.shape(background):
        raise ConfigError(f"stems differ in length: {np.shape(speech)} vs {np.shape(background)}")
    s_pow = np.abs(_stft(speech, cfg)) ** 2
    n_pow = np.abs(_stft(background, cfg)) ** 2
    total = s_pow + n_pow
    return np.sqrt(np.divide(s_pow, total, out=np.zeros_like(total), where=total > 0)).astype(np.float32)


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray | float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019, zero-mean), computed by fast-bss-eval.

    Args:
        reference, estimate: float ``(..., num_samples)`` of one shape; computed in float64.

    Returns:
        A float for 1-D input, else an array of the leading shape. Clamped at ``SI_SDR_CLAMP_DB``.
    """
    ref, est = np.asarray(reference, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    if ref.shape != est.shape or ref.shape[-1] == 0:
        raise ConfigError(f"reference {ref.shape} and estimate {est.shape} must share a non-empty shape")
    # fast_bss_eval.si_sdr() solves a permutation (and fails on a perfect estimate without torch
    # installed, 0.1.4); the loss form scores each estimate against its own reference, negated.
    value = -si_sdr_loss(est, ref, zero_mean=True, clamp_db=SI_SDR_CLAMP_DB)
    return float(value) if np.ndim(value) == 0 else value


def si_sdr_improvement(reference: np.ndarray, estimate: np.ndarray, mixture: np.ndarray) -> np.ndarray | float:
    """SI-SDR of the estimate minus SI-SDR of the unprocessed mixture, dB."""
    return si_sdr(reference, estimate) - si_sdr(reference, mixture)


def separate(model: keras.Model, mixture: np.ndarray, *, cfg: SeparationConfig) -> np.ndarray:
    """Estimate the speech in one mixture ``(num_samples,)`` -> float32 ``(num_samples,)``."""
    magnitude, _ = stft_mag_phase(mixture, cfg=cfg)
    out = model.predict({"magnitude": magnitude[None], "lengths": np.array([len(magnitude)], dtype=np.int32)},
                        verbose=0)
    return apply_mask_istft(mixture, out["mask"][0], cfg=cfg)
