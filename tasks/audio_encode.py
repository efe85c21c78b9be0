"""Writing the lossy formats libsndfile cannot write (M4A/AAC, raw AAC, MP4, Ogg Opus, WebM, WMA) via PyAV.

In: float samples ``(frames, channels)`` in [-1, 1] and a format name from ``ENCODED_FORMATS``. Out: a file
(or bytes) with the same bytes for the same input (ffmpeg's bitexact flags: no random stream serials or
segment ids). Used by the synthetic messy archive, the tests and the benchmarks, never by featurize.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# name -> (ffmpeg muxer, encoder, bit rate); the extension audiopipe lists for it is the name itself.
ENCODED_FORMATS: dict[str, tuple[str, str, int]] = {
    "m4a": ("ipod", "aac", 96_000),
    "aac": ("adts", "aac", 96_000),
    "mp4": ("mp4", "aac", 96_000),
    "opus": ("ogg", "libopus", 64_000),
    "webm": ("webm", "libopus", 64_000),
    "wma": ("asf", "wmav2", 96_000),
}
_BLOCK_FRAMES = 65_536  # memory stays at one block however long the signal


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str, *, bit_rate: int | None = None) -> bytes:
    """``samples`` (frames, channels) float32 -> the bytes of a ``fmt`` file (see ``ENCODED_FORMATS``).

    Opus encodes at 8/12/16/24/48 kHz only: other rates are refused rather than silently resampled.
    """
    buf = io.BytesIO()
    write_encoded(buf, [samples], sample_rate, fmt, bit_rate=bit_rate)
    return buf.getvalue()


def write_encoded(target: str | Path | io.IOBase, blocks, sample_rate: int, fmt: str, *,
                  bit_rate: int | None = None) -> None:
    """Encode an iterable of ``(frames, channels)`` float32 blocks into ``target`` (a path or a file)."""
    import av

    muxer, codec, default_rate = ENCODED_FORMATS[fmt]
    if codec == "libopus" and sample_rate not in (8000, 12000, 16000, 24000, 48000):
        raise ValueError(f"opus encodes at 8, 12, 16, 24 or 48 kHz, not {sample_rate} Hz")
    out = str(target) if isinstance(target, Path) else target
    with av.open(out, "w", format=muxer, options={"fflags": "+bitexact"}) as container:
        stream = None
        pts = 0
        for block in blocks:
            block = np.asarray(block, np.float32)
            block = block[:, None] if block.ndim == 1 else block
            if stream is None:
                stream = container.add_stream(codec, rate=sample_rate,
                                              layout="mono" if block.shape[1] == 1 else "stereo")
                stream.bit_rate = bit_rate or default_rate
                stream.codec_context.flags |= av.codec.context.Flags.bitexact
            for start in range(0, len(block), _BLOCK_FRAMES):
                part = np.ascontiguousarray(block[start:start + _BLOCK_FRAMES].T)
                frame = av.AudioFrame.from_ndarray(part, format="fltp", layout=stream.layout.name)
                frame.sample_rate, frame.pts = sample_rate, pts
                pts += part.shape[1]
                container.mux(stream.encode(frame))
        if stream is not None:
            container.mux(stream.encode(None))
