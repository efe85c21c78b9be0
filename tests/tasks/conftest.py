"""Shared fixtures for tests/tasks: real audio bytes on a private ``memory://`` prefix per test."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
import pytest
import soundfile as sf

from audiopipe.tasks import synth
from audiopipe.tasks.extract import SourceFile


def encode(data: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """Encode ``data`` ((frames,) or (frames, channels)) with soundfile into bytes."""
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def make_signal(sr: int, duration_s: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Tones plus white noise (never silent), a different pitch per channel; (frames, channels) float32."""
    rng = np.random.default_rng([seed, sr, channels])
    cols = []
    for c in range(channels):
        x = synth.tone(220.0 * (1 + 0.5 * c), duration_s, sr, amplitude=0.25)
        x = x + synth.tone(1234.0 + 100.0 * c, duration_s, sr, amplitude=0.1)
        x = x + synth.noise(duration_s, sr, rng=rng, amplitude=0.05)
        cols.append(x)
    return np.stack(cols, axis=1).astype(np.float32)


@dataclass
class MemStore:
    """A private prefix on the process-wide ``memory://`` filesystem."""

    fs: fsspec.AbstractFileSystem
    root: str  # "/<uuid>"

    def url(self, name: str) -> str:
        return f"memory:/{self.root}/{name}"

    def put_bytes(self, name: str, data: bytes) -> SourceFile:
        self.fs.pipe_file(f"{self.root}/{name}", data)
        return SourceFile(self.url(name), len(data))

    def put_audio(self, name: str, data: np.ndarray, sr: int, fmt: str = "WAV",
                  subtype: str | None = None) -> SourceFile:
        return self.put_bytes(name, encode(data, sr, fmt, subtype))


@pytest.fixture
def mem() -> MemStore:
    fs = fsspec.filesystem("memory")
    store = MemStore(fs, f"/t-{uuid.uuid4().hex}")
    yield store
    if fs.exists(store.root):
        fs.rm(store.root, recursive=True)


@pytest.fixture(name="encode")
def encode_fixture():
    """``encode(data, sr, fmt="WAV", subtype=None) -> bytes`` (soundfile into memory)."""
    return encode


@pytest.fixture(name="signal")
def signal_fixture():
    """``signal(sr, duration_s, channels=1, seed=0) -> (frames, channels) float32`` tones + noise."""
    return make_signal
