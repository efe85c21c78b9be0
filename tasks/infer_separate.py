"""Bulk inference, separate: one recording at a time through the mask model, stems streamed to FLAC.

In: a ``SourceFile``, the worker's ``LoadedModel`` and the ``InferSpec``. Out: an ``InferOutput`` with the
URLs of the speech and background stems it wrote (``<stems_url>/<path below in_url>/<stem>.flac``), or a
rejection reason (undecodable audio, a non-finite mask). Windows as in ``tasks.infer``; each window's core
is written to local FLAC files, uploaded once the recording is done. No Prefect or Dask imports here.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from audiopipe.infra.errors import BadAudioError
from audiopipe.infra.storage import StorageSpec, join, open_fs, put_file_atomic
from audiopipe.tasks.extract import SourceFile, header_of
from audiopipe.tasks.infer import InferOutput, InferSpec, LoadedModel, _open, iter_windows, nonfinite_reason

STEMS = ("speech", "background")


def stem_urls(spec: InferSpec, source_url: str) -> dict[str, str]:
    """Where the stems of ``source_url`` go: ``<stems_url>/<path relative to in_url>/<stem>.flac``."""
    from audiopipe.tasks.infer_layout import relative_source

    rel = relative_source(spec.in_url, source_url)
    return {stem: join(spec.stems_url, rel, f"{stem}.flac") for stem in STEMS}


def separate_one(source: SourceFile, loaded: LoadedModel, spec: InferSpec, storage: StorageSpec) -> InferOutput:
    import soundfile as sf

    from audiopipe.models.separation import SeparationConfig, apply_mask_istft, stft_mag_phase

    out = InferOutput(source.url, reason=source.rejected)  # rejected at discovery (dangling symlink...)
    if out.reason:
        return out
    settings = spec.feature_config
    cfg = SeparationConfig(sampling_rate=int(settings["sampling_rate"]), n_fft=int(settings["n_fft"]),
                           hop=int(settings["hop"]))
    rate = cfg.sampling_rate
    tmp = tempfile.mkdtemp(prefix="audiopipe-stems-")
    paths = {stem: os.path.join(tmp, f"{stem}.flac") for stem in STEMS}
    try:
        try:
            handle, snd, out.info = _open(source, storage, stream=True)
        except BadAudioError as exc:
            return InferOutput(source.url, reason=str(exc), info=header_of(exc))
        writers = {stem: sf.SoundFile(p, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16")
                   for stem, p in paths.items()}
        try:
            for window in iter_windows(handle, snd, out.info, core_s=spec.window_s, context_s=spec.context_s,
                                       rate=rate):
                t0 = time.perf_counter()
                magnitude, _ = stft_mag_phase(window.samples, cfg=cfg)
                mask = loaded.predict(magnitude[None], np.array([len(magnitude)], np.int32)).numpy()[0]
                bad = nonfinite_reason(mask, window.core_start_s, "mask values")
                if bad:
                    return InferOutput(source.url, reason=bad, info=out.info)
                speech = apply_mask_istft(window.samples, mask, cfg=cfg)
                out.timings["model_s"] += time.perf_counter() - t0
                lo = int(round((window.core_start_s - window.start_s) * rate))
                core = slice(lo, lo + int(round(window.core_s * rate)))
                writers["speech"].write(np.clip(speech[core], -1, 1))
                writers["background"].write(np.clip(window.samples[core] - speech[core], -1, 1))
                out.audio_s += window.core_s
                out.windows += 1
        except BadAudioError as exc:
            return InferOutput(source.url, reason=str(exc), info=out.info)
        finally:
            for w in writers.values():
                w.close()
            snd.close()
            handle.close()
        if out.windows == 0:
            return InferOutput(source.url, reason="empty: no audio samples", info=out.info)
        t0 = time.perf_counter()
        for stem, url in stem_urls(spec, source.url).items():
            fs, path = open_fs(url, storage)
            put_file_atomic(fs, paths[stem], path)
            out.stems[stem] = url
        out.timings["write_s"] += time.perf_counter() - t0
        return out
    finally:
        for p in paths.values():
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(tmp)
