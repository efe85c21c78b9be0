"""Separation: STFT/ISTFT and oracle-mask DSP, SI-SDR via fast-bss-eval, and the tiny mask estimator."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from audiopipe.infra.errors import ConfigError
from audiopipe.models import separation as sep
from audiopipe.models.layers import CUDNN_LSTM_CONFIG, cudnn_ineligible_layers

CFG = sep.SeparationConfig()
TINY = sep.SeparationConfig(n_fft=64, hop=16, hidden_units=8, lstm_layers=1, dropout=0.0)
SR = CFG.sampling_rate


def _stems(seconds: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A voiced-speech-like stem (harmonics of a gliding f0, syllable envelope) and white noise, ~0 dB SNR."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 3 * t)) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)
    return (0.3 * voiced).astype(np.float32), (0.2 * rng.normal(size=t.size)).astype(np.float32)


def _si_sdr_reference(ref: np.ndarray, est: np.ndarray) -> float:
    """Textbook SI-SDR (Le Roux et al. 2019) for the cross-check."""
    ref, est = ref - ref.mean(), est - est.mean()
    target = (est @ ref) / (ref @ ref) * ref
    return float(10 * np.log10((target @ target) / ((est - target) @ (est - target))))


def test_si_sdr_of_identical_signals_is_huge_and_scale_invariant():
    speech, noise = _stems(0.5)
    assert sep.si_sdr(speech, speech) >= 90.0
    noisy = speech + noise
    assert sep.si_sdr(speech, 3.0 * noisy) == pytest.approx(sep.si_sdr(speech, noisy), abs=1e-6)
    assert sep.si_sdr(speech, -0.1 * noisy) == pytest.approx(sep.si_sdr(speech, noisy), abs=1e-6)


def test_si_sdr_matches_the_textbook_formula_and_batches():
    speech, noise = _stems(0.5)
    for gain in (0.3, 1.0, 3.0):
        assert sep.si_sdr(speech, speech + gain * noise) == pytest.approx(
            _si_sdr_reference(speech.astype(np.float64), (speech + gain * noise).astype(np.float64)), abs=1e-4)
    batch = sep.si_sdr(np.stack([speech, speech]), np.stack([speech + noise, speech + 2 * noise]))
    assert batch.shape == (2,) and batch[0] > batch[1]
    with pytest.raises(ConfigError):
        sep.si_sdr(speech, speech[:-1])


def test_stft_shapes_and_identity_mask_reconstructs():
    speech, noise = _stems(0.5)
    mixture = speech + noise
    mag, phase = sep.stft_mag_phase(mixture, cfg=CFG)
    assert mag.shape == phase.shape == (1 + len(mixture) // CFG.hop, CFG.n_fft // 2 + 1)
    out = sep.apply_mask_istft(mixture, np.ones_like(mag), cfg=CFG)
    assert out.shape == mixture.shape
    np.testing.assert_allclose(out, mixture, atol=1e-4)
    with pytest.raises(ConfigError):
        sep.apply_mask_istft(mixture, np.ones((3, 5)), cfg=CFG)


def test_ideal_ratio_mask_on_the_true_mixture_gives_a_big_improvement():
    speech, noise = _stems(1.0)
    mixture = speech + noise
    mask = sep.irm(speech, noise, cfg=CFG)
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    improvement = sep.si_sdr_improvement(speech, sep.apply_mask_istft(mixture, mask, cfg=CFG), mixture)
    assert improvement > 10.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    rows = [_stems(0.1, seed) for seed in range(4)]
    mags = np.stack([sep.stft_mag_phase(s + n, cfg=TINY)[0] for s, n in rows])
    clean = np.stack([sep.stft_mag_phase(s, cfg=TINY)[0] for s, _ in rows])
    lengths = np.full(4, mags.shape[1], dtype=np.int32)
    lengths[-1] = 60  # one padded row
    mags[-1, 60:] = clean[-1, 60:] = 0.0
    model = sep.build_separation(TINY)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sep.separation_losses())
    x = {"magnitude": mags, "lengths": lengths}
    history = model.fit(x, {"estimate": clean}, epochs=10, batch_size=2, verbose=0).history["loss"]
    path = tmp_path_factory.mktemp("sep") / "model.keras"
    model.save(path)
    return model, x, history, path


def test_fit_lowers_the_loss(trained):
    history = trained[2]
    assert history[-1] < 0.8 * history[0]


def test_outputs_are_a_mask_and_the_masked_mixture(trained):
    model, x, _, _ = trained
    out = model.predict(x, verbose=0)
    assert out["mask"].shape == out["estimate"].shape == x["magnitude"].shape
    assert out["mask"].min() >= 0.0 and out["mask"].max() <= 1.0
    np.testing.assert_allclose(out["estimate"], out["mask"] * x["magnitude"], rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_in_safe_mode(trained):
    model, x, _, path = trained
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["mask"], model.predict(x, verbose=0)["mask"],
                               atol=1e-6)


def test_lstms_keep_the_cudnn_configuration(trained):
    model = trained[0]
    for i in range(TINY.lstm_layers):
        inner = model.get_layer(f"bilstm{i}").forward_layer.get_config()
        assert {k: inner[k] for k in CUDNN_LSTM_CONFIG} == CUDNN_LSTM_CONFIG
    assert cudnn_ineligible_layers(model) == []


def test_separate_returns_a_signal_of_the_mixture_length(trained):
    speech, noise = _stems(0.2, seed=9)
    out = sep.separate(trained[0], speech + noise, cfg=TINY)
    assert out.shape == speech.shape and np.all(np.isfinite(out))


@pytest.mark.parametrize("bad", [{"hop": 0}, {"hop": 1024}, {"hidden_units": 7}, {"dropout": 1.0}])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        sep.SeparationConfig(**bad)
