"""Listing audio under a local tree, and the output-writable probe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from audiopipe.infra.errors import StorageError
from audiopipe.infra.storage import StorageSpec
from audiopipe.tasks.discover import check_output_writable, is_audio_name, list_audio_sources

AUDIO = [
    "a.wav",
    "B.WAV",
    "c.Flac",
    "d.FLAC",
    "e.OgG",
    "f.mp3",
    "g.aiff",
    "h.AIF",
    "i.opus",
    "j.m4a",  # listed (then rejected with a reason), never silently skipped
    "k.AAC",
    "l.wave",
    "sous dossier/café été.wav",
    "日本語/音声テスト.flac",
    "names with spaces/my recording 01.wav",
    "nested/level1/level2/level3/deep.flac",
    "nested/level1/x.oga",
    "nested/level1/y.aifc",
    "double.ext.tar.wav",
]
IGNORED = [
    "notes.txt",
    "README",
    "nested/level1/level2/cover.jpg",
    "a.wav.txt",
    "wav",
    "nested/readme.WAV.md",
    "sous dossier/x.wma",
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "in put"
    for i, rel in enumerate(AUDIO + IGNORED):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i + 1))
    return root


@pytest.mark.parametrize("as_url", [False, True])
def test_list_audio_sources_local_tree(tree: Path, as_url: bool):
    in_url = f"file://{tree}" if as_url else str(tree)

    sources = list_audio_sources(in_url, StorageSpec())

    urls = [s.url for s in sources]
    assert urls == sorted(urls)
    assert urls == sorted(f"file://{tree}/{rel}" for rel in AUDIO)
    sizes = {s.url: s.size for s in sources}
    for i, rel in enumerate(AUDIO):
        assert sizes[f"file://{tree}/{rel}"] == i + 1
    for s in sources:
        assert s.etag is None
        assert s.mtime == pytest.approx(os.stat(s.url[len("file://"):]).st_mtime)
        assert s.version == f"{round(s.mtime * 1_000_000)}:{s.size}"  # microseconds, as the manifest keeps it


def test_list_single_file(tree: Path):
    (src,) = list_audio_sources(str(tree / "sous dossier" / "café été.wav"), StorageSpec())
    assert src.url == f"file://{tree}/sous dossier/café été.wav"


def test_list_trailing_slash(tree: Path):
    assert list_audio_sources(str(tree) + "/", StorageSpec()) == list_audio_sources(str(tree), StorageSpec())


def test_empty_dir_says_no_audio_files(tmp_path: Path):
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "notes.txt").write_text("hi")
    for root in (tmp_path / "only_text", tmp_path):
        with pytest.raises(StorageError, match="no audio files"):
            list_audio_sources(str(root), StorageSpec())
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="no audio files"):
        list_audio_sources(str(tmp_path / "empty"), StorageSpec())


def test_missing_dir_says_does_not_exist(tmp_path: Path):
    with pytest.raises(StorageError, match="does not exist") as err:
        list_audio_sources(str(tmp_path / "nope"), StorageSpec())
    assert str(tmp_path / "nope") in str(err.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.wav", True), ("A.WAV", True), ("dir.wav/file", False), ("x/y.Mp3", True), ("x.txt", False),
     ("wav", False), ("x.wav.bak", False), ("x.", False), ("dir/.flac", True), ("x.m4a", True)],
)
def test_is_audio_name(name, expected):
    assert is_audio_name(name) is expected


def test_check_output_writable_creates_local_dir(tmp_path: Path):
    out = tmp_path / "a" / "b" / "out dir"
    check_output_writable(str(out), StorageSpec())
    assert out.is_dir()
    assert list(out.iterdir()) == []  # the probe object was removed
    check_output_writable(f"file://{out}", StorageSpec())  # existing dir, URL form
    assert list(out.iterdir()) == []


def test_check_output_writable_memory(mem):
    check_output_writable(mem.url("out"), StorageSpec())
    assert not mem.fs.exists(f"{mem.root}/out/_audiopipe_write_probe")


def test_check_output_writable_fails_on_a_file(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StorageError):
        check_output_writable(str(blocker / "out"), StorageSpec())
