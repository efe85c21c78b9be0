"""CTC recogniser: build, train a few steps, save/load, loss exactness, and decoding on hand-made matrices."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from audiopipe.infra.errors import ConfigError
from audiopipe.models import asr_ctc as asr
from audiopipe.models.layers import (CUDNN_LSTM_CONFIG, FrameSplit, FrameStack, SpecAugment, cudnn_ineligible_layers,
                                     lstm, output_lengths)
from audiopipe.models.metrics import cer, char_alignment, wer

TINY = asr.CtcAsrConfig(n_mels=16, conv_channels=4, lstm_units=8, lstm_layers=2, subsample=4, dropout=0.1,
                        spec_augment=asr.SpecAugmentConfig(freq_mask_bins=3, time_mask_frames=4))
TEXTS = ["cat", "a dog", "hi", "no"]


def _batch(cfg: asr.CtcAsrConfig, lengths, seed: int = 0):
    """Random 'log-mel' frames, zero past each row's length (as the data pipeline pads)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int32)
    x = rng.normal(size=(len(lengths), int(lengths.max()), cfg.n_mels)).astype(np.float32)
    x[np.arange(x.shape[1])[None, :] >= lengths[:, None]] = 0.0
    return {"features": x, "lengths": lengths}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = asr.build_ctc_asr(TINY)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=asr.CtcLoss())
    x = _batch(TINY, [40, 33, 20, 13])
    labels, _ = asr.encode_batch(TEXTS)
    history = model.fit(x, labels, epochs=12, batch_size=4, verbose=0).history["loss"]
    path = tmp_path_factory.mktemp("asr") / "model.keras"
    model.save(path)
    return model, x, labels, history, path


def test_fit_lowers_the_loss(trained):
    _, _, _, history, _ = trained
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.8 * history[0]


@pytest.mark.parametrize("frontend, subsample", [("conv2d", 4), ("conv2d", 2), ("stack", 4), ("stack", 1)])
def test_output_shape_follows_the_front_end(frontend, subsample):
    cfg = asr.CtcAsrConfig(n_mels=16, frontend=frontend, subsample=subsample, conv_channels=2, lstm_units=4,
                           lstm_layers=1, spec_augment=None)
    out = asr.build_ctc_asr(cfg).predict(_batch(cfg, [37, 20]), verbose=0)
    assert out.shape == (2, math.ceil(37 / subsample), len(asr.DEFAULT_VOCAB) + 1)
    assert out.dtype == np.float32


def test_frame_split_inverts_frame_stack():
    x = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)
    stacked = FrameStack(2)(x)
    assert tuple(stacked.shape) == (2, 4, 6)
    split = np.asarray(FrameSplit(2)(stacked))
    np.testing.assert_array_equal(split[:, :7], x)
    np.testing.assert_array_equal(split[:, 7], 0.0)  # FrameStack's zero padding


@pytest.mark.parametrize("frontend", ["conv2d", "stack"])
def test_upsample_runs_the_lstms_at_half_the_output_rate_and_stays_exact(frontend, tmp_path):
    cfg = asr.CtcAsrConfig(n_mels=16, frontend=frontend, subsample=2, upsample=2, conv_channels=2, lstm_units=4,
                           lstm_layers=1, spec_augment=None)
    assert cfg.reduction == 4
    model = asr.build_ctc_asr(cfg)
    x = _batch(cfg, [37, 20, 9])
    logits = model.predict(x, verbose=0)
    steps = keras.Model(model.inputs, model.get_layer("bilstm0").output).predict(x, verbose=0).shape[1]
    assert steps == math.ceil(37 / 4) and logits.shape[1] == 2 * steps  # 20 frames, 19 of them valid
    out_len = output_lengths(x["lengths"], 2)
    for row, n in enumerate(out_len):
        assert np.all(logits[row, n:].argmax(-1) == asr.BLANK)
    alone = model.predict({"features": x["features"][1:2, :20], "lengths": x["lengths"][1:2]}, verbose=0)
    np.testing.assert_allclose(alone[0, :out_len[1]], logits[1, :out_len[1]], atol=1e-5)
    labels, label_lengths = asr.encode_batch(["abcdefghijklmnopq", "abcdefgh", "abcd"])  # 17 > ceil(37/4) steps
    own = np.asarray(asr.ctc_loss(labels, logits, label_lengths, out_len))
    assert np.all(np.isfinite(own))
    np.testing.assert_allclose(np.asarray(asr.CtcLoss()(labels, logits)), own.mean(), rtol=1e-5)
    model.save(tmp_path / "up.keras")
    loaded = keras.saving.load_model(tmp_path / "up.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), logits, atol=1e-6)


def test_padded_frames_are_certain_blanks_and_rows_ignore_batch_padding(trained):
    model, x, _, _, _ = trained
    logits = model.predict(x, verbose=0)
    out_len = output_lengths(x["lengths"], TINY.subsample)
    short = 3  # the 13-frame row, alone and unpadded
    alone = model.predict({"features": x["features"][short:, :13], "lengths": x["lengths"][short:]}, verbose=0)
    np.testing.assert_allclose(alone[0], logits[short, :out_len[short]], atol=1e-5)
    assert np.all(logits[short, out_len[short]:].argmax(-1) == asr.BLANK)


def test_ctc_loss_is_finite_and_padding_exact(trained):
    model, x, labels, _, _ = trained
    logits = model.predict(x, verbose=0)
    label_lengths = np.count_nonzero(labels, axis=1)
    own = np.asarray(asr.ctc_loss(labels, logits, label_lengths, output_lengths(x["lengths"], TINY.subsample)))
    padded = np.asarray(asr.ctc_loss(labels, logits, label_lengths, np.full(4, logits.shape[1])))
    assert np.all(np.isfinite(own)) and np.all(own > 0)
    np.testing.assert_allclose(own, padded, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(asr.CtcLoss()(labels, logits)), own.mean(), rtol=1e-5)


def test_save_load_round_trip_in_safe_mode(trained):
    model, x, _, _, path = trained
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert isinstance(loaded.loss, asr.CtcLoss)


def test_lstms_keep_the_cudnn_configuration(trained):
    model = trained[0]
    lstms = [inner for layer in model.layers if isinstance(layer, keras.layers.Bidirectional)
             for inner in (layer.forward_layer, layer.backward_layer)]
    assert len(lstms) == 2 * TINY.lstm_layers
    for layer in lstms:
        cfg = layer.get_config()
        assert {k: cfg[k] for k in CUDNN_LSTM_CONFIG} == CUDNN_LSTM_CONFIG
        assert layer.use_cudnn in ("auto", True)
    assert cudnn_ineligible_layers(model) == []
    bad = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(2, recurrent_dropout=0.1, name="slow")])
    assert cudnn_ineligible_layers(bad) == ["slow"]
    assert lstm(3).get_config()["unroll"] is False


def test_spec_augment_masks_in_training_only():
    layer = SpecAugment(num_freq_masks=1, freq_mask_bins=4, num_time_masks=1, time_mask_frames=10, seed=1)
    x = np.ones((8, 50, 16), dtype=np.float32)
    lengths = np.full(8, 50, dtype=np.int32)
    np.testing.assert_array_equal(np.asarray(layer([x, lengths], training=False)), x)
    masked = np.asarray(layer([x, lengths], training=True))
    assert 0.0 < (masked == 0).mean() < 0.5
    assert set(np.unique(masked)) <= {0.0, 1.0}


# --- vocabulary ---------------------------------------------------------------------------------------------

def test_encode_decode_round_trip_and_blank_is_zero():
    ids = asr.encode_text("it's a cat")
    assert ids.min() >= 1 and asr.decode_ids(ids) == "it's a cat"
    assert asr.encode_text(" ")[0] == 1 and asr.encode_text("a")[0] == 3
    labels, lengths = asr.encode_batch(["ab", "abc"])
    assert labels.tolist() == [[3, 4, 0], [3, 4, 5]] and lengths.tolist() == [2, 3]
    assert asr.required_frames(asr.encode_text("hello")) == 6


def test_unknown_characters_are_a_clear_error():
    with pytest.raises(ConfigError, match=r"\['!', 'C'\]"):
        asr.encode_text("Cat!")


@pytest.mark.parametrize("bad", [{"subsample": 3}, {"frontend": "lstm"}, {"vocab": "aab"}, {"dropout": 1.0},
                                 {"lstm_layers": 0}, {"n_mels": 8}, {"subsample": 4, "upsample": 2},
                                 {"upsample": 0}])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        asr.CtcAsrConfig(**bad)  # n_mels=8 < default freq_mask_bins=15


def test_config_dict_round_trip():
    assert asr.CtcAsrConfig.from_dict(TINY.to_dict()) == TINY


# --- decoding on hand-made probability matrices -----------------------------------------------------------

def _probs(frames: list[dict[str, float]], vocab: str = asr.DEFAULT_VOCAB) -> np.ndarray:
    """(1, frames, classes) log-probabilities; '_' is the blank; unlisted classes share the leftover mass."""
    out = np.zeros((len(frames), len(vocab) + 1))
    for t, frame in enumerate(frames):
        rest = (1.0 - sum(frame.values())) / (len(vocab) + 1 - len(frame))
        out[t] = rest
        for ch, p in frame.items():
            out[t, 0 if ch == "_" else vocab.index(ch) + 1] = p
    return np.log(out)[None]


def test_greedy_and_beam_decode_c_a_a_blank_t_to_cat():
    logits = _probs([{"c": .9}, {"a": .8}, {"a": .7}, {"_": .9}, {"t": .9}])
    assert asr.greedy_decode(logits, [5]) == ["cat"]
    assert asr.beam_search_decode(logits, [5], beam_width=8) == ["cat"]
    ids, _ = keras.ops.ctc_decode(logits.astype(np.float32), np.array([5]), strategy="greedy")
    assert asr.decode_ids(np.asarray(ids)[0, 0]) == "cat"
    double = _probs([{"c": .9}, {"a": .8}, {"_": .7}, {"a": .8}, {"t": .9}])
    assert asr.greedy_decode(double, [5]) == ["caat"]
    assert asr.greedy_decode(logits, [2]) == ["ca"]  # only the row's own length is read


def test_beam_search_sums_paths_where_greedy_cannot():
    # Each frame: blank .4, a .35. Best path is blank-blank (""), but "a" has three paths: .4025 > .16.
    logits = _probs([{"_": .4, "a": .35}, {"_": .4, "a": .35}])
    assert asr.greedy_decode(logits, [2]) == [""]
    assert asr.beam_search_decode(logits, [2], beam_width=4) == ["a"]


def test_beam_search_with_lm_prefers_the_likely_string_when_acoustics_are_ambiguous():
    logits = _probs([{"c": .9}, {"o": .5, "a": .4}, {"t": .9}])
    lm = asr.CharNgramLM.fit(["cat", "the cat sat", "a cat", "cats"], order=3, k=0.1)
    assert asr.beam_search_decode(logits, [3]) == ["cot"]
    assert asr.beam_search_decode(logits, [3], lm=lm, lm_weight=1.0) == ["cat"]
    assert lm.score("cat") > lm.score("cot")
    again = asr.CharNgramLM.from_dict(lm.to_dict())
    assert again.score("cot") == pytest.approx(lm.score("cot"))


def test_beam_search_with_lexicon_keeps_to_known_words():
    logits = _probs([{"c": .9}, {"o": .5, "a": .4}, {"t": .9}, {" ": .9}, {"o": .6, "a": .3}])
    lexicon = asr.Lexicon.from_texts(["cat a", "dog"])
    assert asr.beam_search_decode(logits, [5]) == ["cot o"]
    assert asr.beam_search_decode(logits, [5], lexicon=lexicon) == ["cat a"]


def test_char_ngram_lm_matches_hand_computation():
    lm = asr.CharNgramLM.fit(["ab"], order=2, k=1.0, vocab="ab")  # events a, b, end: 3
    assert math.exp(lm.log_prob("", "a")) == pytest.approx((1 + 1) / (1 + 3))
    assert math.exp(lm.log_prob("", "b")) == pytest.approx(1 / 4)
    assert math.exp(lm.log_prob("a", "b")) == pytest.approx(2 / 4)
    assert math.exp(lm.log_prob("b", lm.EOS)) == pytest.approx(2 / 4)
    assert math.exp(lm.log_prob("bb", "a")) == pytest.approx(1 / 4)  # context b seen once, then end
    assert lm.score("ab") == pytest.approx(3 * math.log(0.5))


# --- error rates --------------------------------------------------------------------------------------------

def test_cer_and_wer_by_hand():
    assert cer(["cat", "dog"], ["cut", "dog"]) == pytest.approx(1 / 6)
    assert wer(["the cat sat"], ["the cat"]) == pytest.approx(1 / 3)
    assert [c.kind for c in char_alignment("cat", "cut")] == ["equal", "substitute", "equal"]
    with pytest.raises(ConfigError):
        cer(["a"], ["a", "b"])


def test_beam_decoder_from_files_fits_its_lm_and_lexicon_and_skips_unusable_lines(tmp_path):
    from audiopipe.infra.storage import StorageSpec
    from audiopipe.tasks.evaluation import beam_decoder

    # through the shared normaliser: "the cat!" -> "the cat"; "日本" leaves nothing and is skipped
    (tmp_path / "lm.txt").write_text("The  cat sat\nthe cat!\n\na cat\n日本\ncats\n")
    (tmp_path / "words.txt").write_text("cat a\ndog\n")
    logits = _probs([{"c": .9}, {"o": .5, "a": .4}, {"t": .9}, {" ": .9}, {"o": .6, "a": .3}])
    plain = beam_decoder(StorageSpec(), beam_width=8, insertion_bonus=0.0)
    assert plain(logits, np.array([5])) == ["cot o"] and plain.lm is None
    with_lm = beam_decoder(StorageSpec(), beam_width=8, lm_text_url=f"file://{tmp_path}/lm.txt", lm_order=3,
                           lm_weight=1.0, insertion_bonus=0.0)
    assert with_lm.lm.order == 3 and sum(with_lm.lm.counts.get("\x02\x02", {}).values()) == 4  # 4 sentences kept
    assert with_lm(logits[:, :3], np.array([3])) == ["cat"]
    with_words = beam_decoder(StorageSpec(), beam_width=8, lexicon_url=str(tmp_path / "words.txt"),
                              insertion_bonus=0.0)
    assert with_words(logits, np.array([5])) == ["cat a"]
    assert "lexicon of 3 words" in with_words.describe()
    (tmp_path / "bad.txt").write_text("!!! ???\n日本\n")
    with pytest.raises(ConfigError, match="nothing to fit an LM on"):
        beam_decoder(StorageSpec(), lm_text_url=str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError, match="no such file"):
        beam_decoder(StorageSpec(), lexicon_url=str(tmp_path / "missing.txt"))


def test_config_from_partial_overrides_keeps_defaults_and_builds_spec_augment():
    default = asr.CtcAsrConfig.from_dict({"n_mels": 40})
    assert default.spec_augment == asr.SpecAugmentConfig()  # a missing key keeps its default
    lighter = asr.CtcAsrConfig.from_dict({"n_mels": 40, "dropout": 0.1, "spec_augment": {"num_time_masks": 1}})
    assert lighter.spec_augment == asr.SpecAugmentConfig(num_time_masks=1) and lighter.dropout == 0.1
    assert asr.CtcAsrConfig.from_dict({"n_mels": 40, "spec_augment": None}).spec_augment is None
    with pytest.raises(ConfigError, match=r"spec_augment.time_masks"):
        asr.CtcAsrConfig.from_dict({"n_mels": 40, "spec_augment": {"time_masks": 1}})
    with pytest.raises(ConfigError, match="lstm_size"):
        asr.CtcAsrConfig.from_dict({"n_mels": 40, "lstm_size": 9})


# ---- the vectorised beam search (models/ctc_decode.py) and the alignment of its result (models/ctc_align.py)

def _random_log_probs(rng, frames: int) -> np.ndarray:
    from audiopipe.models.ctc_decode import log_softmax

    logits = rng.normal(0.0, 3.0, size=(frames, len(asr.DEFAULT_VOCAB) + 1))
    logits[:, 0] += rng.uniform(0.0, 4.0)  # blank-heavy, like a trained model, at random strengths
    return log_softmax(logits)


def test_vectorised_beam_search_finds_what_the_reference_search_finds():
    """Without its two shortcuts (top-k characters, blank-frame skipping) the vectorised search is exact:
    the same best prefix as the one-prefix-at-a-time specification, with and without an LM."""
    from audiopipe.models import ctc_decode as dec

    rng = np.random.default_rng(7)
    lm = dec.CharNgramLM.fit(["the cat sat on the mat", "a cat is here", "cats and dogs"], order=3)
    for trial in range(40):
        lp = _random_log_probs(rng, int(rng.integers(3, 40)))
        for kw in ({"lm": None, "lm_weight": 0.0, "insertion_bonus": 0.0},
                   {"lm": lm, "lm_weight": 0.7, "insertion_bonus": 1.0}):
            want = dec._reference_search(lp, beam_width=6, vocab=dec.DEFAULT_VOCAB, lm=kw["lm"],
                                         lm_weight=kw["lm_weight"], bonus=kw["insertion_bonus"], lexicon=None)
            ids, frames = dec.beam_search(lp, beam_width=6, max_candidates=None, blank_skip=None, **kw)
            assert dec.decode_ids(ids) == want, trial
            assert (np.diff(frames) > 0).all() and (frames < len(lp)).all()


def test_beam_search_shortcuts_keep_the_answer_on_peaky_outputs_and_words_get_peak_times():
    from audiopipe.models import ctc_decode as dec
    from audiopipe.models.ctc_align import decode_words

    frames = [{"_": .9999}, {"c": .9}, {"c": .6, "_": .3}, {"_": .9995}, {"a": .7, "o": .2}, {"_": .999},
              {"t": .95}, {"_": .9999}, {" ": .8}, {"_": .9999}, {"a": .9}, {"_": .9999}]
    lp = _probs(frames)[0]
    lm = dec.CharNgramLM.fit(["cat a", "a cat"], order=3)
    exact = dec.beam_search(lp, beam_width=8, lm=lm, lm_weight=0.5, max_candidates=None, blank_skip=None)
    fast = dec.beam_search(lp, beam_width=8, lm=lm, lm_weight=0.5)
    assert dec.decode_ids(exact[0]) == dec.decode_ids(fast[0]) == "cat a"
    words = decode_words(lp, frame_s=0.04, vocab=dec.DEFAULT_VOCAB, decoder=dec.BeamDecoder(lm=lm, lm_weight=0.5))
    assert [w.text for w in words] == ["cat", "a"]
    assert words[0].start_s == pytest.approx(0.04) and words[0].end_s == pytest.approx(0.28)  # c at 1, t at 6
    assert words[0].confidence == pytest.approx(np.mean([.9, .7, .95]), abs=1e-3)  # each letter at its peak
    assert words[1].start_s == pytest.approx(0.40)
    greedy = decode_words(lp, frame_s=0.04, vocab=dec.DEFAULT_VOCAB)
    assert [w.text for w in greedy] == ["cat", "a"] and greedy[0].start_s == words[0].start_s


def test_greedy_words_from_log_probs_match_the_frame_id_path():
    """``decode_words`` without a decoder is the greedy alignment transcripts always had."""
    from audiopipe.models.ctc_align import decode_words, frame_outputs, words_from_frames
    from audiopipe.models.ctc_decode import log_softmax

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, size=(300, len(asr.DEFAULT_VOCAB) + 1))
    ids, probs = frame_outputs(logits)
    old = words_from_frames(ids, probs, frame_s=0.04, vocab=asr.DEFAULT_VOCAB, offset_s=1.0)
    new = decode_words(log_softmax(logits), frame_s=0.04, vocab=asr.DEFAULT_VOCAB, offset_s=1.0)
    assert [(w.text, w.start_s, w.end_s) for w in new] == [(w.text, w.start_s, w.end_s) for w in old]
    np.testing.assert_allclose([w.confidence for w in new], [w.confidence for w in old], atol=2e-3)


def test_lm_file_round_trip_is_deterministic_and_checked():
    from audiopipe.models.ctc_decode import CharNgramLM, beam_search

    lm = CharNgramLM.fit(["the cat", "a dog"], order=4)
    blob = lm.to_bytes()
    assert CharNgramLM.fit(["the cat", "a dog"], order=4).to_bytes() == blob  # stable checksum
    again = CharNgramLM.from_bytes(blob)
    assert again.score("the cat") == pytest.approx(lm.score("the cat"))
    row = again.row(again.history("the c"))
    assert row[asr.DEFAULT_VOCAB.index("a") + 1] == pytest.approx(lm.log_prob("the c", "a"))
    assert row[-1] == pytest.approx(lm.log_prob("the c", CharNgramLM.EOS))
    with pytest.raises(ConfigError, match="not a stored character LM"):
        CharNgramLM.from_bytes(b"{}")
    with pytest.raises(ConfigError, match="vocabulary"):
        beam_search(np.zeros((3, 4)), beam_width=2, vocab="abc", lm=lm)
