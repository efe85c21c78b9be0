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
    "j.m4a",  # decoded through PyAV (tasks/audio_av.py)
    "k.AAC",
    "sous dossier/x.wma",
    "clip.mp4",
    "stream.WebM",
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
    "video.mkv",
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


# ------------------------------------------------------------------ symlinks and other non-regular entries

OLD = 1_000_000_000.0  # a target mtime far from the links' own (now), so a version taken from the link shows


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """An input whose audio is mostly symlinks, as git-annex, DVC or a dataset cache lay it out."""
    store = tmp_path / "store"  # outside the input, like an annex object store
    store.mkdir()
    obj = store / "SHA256E-s1234--abcd.wav"
    obj.write_bytes(b"r" * 1234)
    os.utime(obj, (OLD, OLD))
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "plain.wav").write_bytes(b"p" * 10)
    (root / "abs.wav").symlink_to(obj)
    (root / "sub" / "rel.flac").symlink_to(Path("..") / ".." / "store" / obj.name)
    (root / "chain.wav").symlink_to(root / "abs.wav")  # a link to a link to the file
    (root / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (root / "sub" / "dangling_chain.wav").symlink_to(root / "dangling.wav")
    (root / "loop_a.wav").symlink_to(root / "loop_b.wav")
    (root / "loop_b.wav").symlink_to(root / "loop_a.wav")
    (root / "self.mp3").symlink_to("self.mp3")
    (root / "mounted").symlink_to(store)  # a directory link without an audio name
    (root / "up.wav").symlink_to(root)  # a directory link that would loop if followed
    os.mkfifo(root / "pipe.wav")
    (root / "to_pipe.ogg").symlink_to(root / "pipe.wav")
    (root / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not an audio name: ignored, as other files
    return root


def test_symlink_to_a_file_is_an_input_versioned_by_its_target(linked: Path):
    by_url = {s.url: s for s in list_audio_sources(str(linked), StorageSpec())}

    obj = linked.parent / "store" / "SHA256E-s1234--abcd.wav"
    for rel in ("abs.wav", "sub/rel.flac", "chain.wav"):
        src = by_url[f"file://{linked}/{rel}"]  # the link's URL, not the target's
        assert src.rejected is None, src.rejected
        assert (src.size, src.mtime) == (1234, OLD)
        assert src.version == f"{round(OLD * 1_000_000)}:1234"
    assert f"file://{obj}" not in by_url  # the target outside the input is not listed itself
    plain = by_url[f"file://{linked}/plain.wav"]
    assert (plain.size, plain.rejected) == (10, None)


def test_unusable_links_and_special_files_are_listed_with_a_reason(linked: Path):
    by_url = {s.url: s for s in list_audio_sources(str(linked), StorageSpec())}
    reasons = {url.removeprefix(f"file://{linked}/"): s.rejected for url, s in by_url.items() if s.rejected}

    gone = linked.parent / "gone.wav"
    assert reasons == {
        "dangling.wav": f"dangling symlink: target {gone} does not exist",
        "sub/dangling_chain.wav": f"dangling symlink: target {gone} does not exist",
        "loop_a.wav": f"symlink loop: it points to {linked}/loop_b.wav, which leads back to a link on its own "
                      "path (too many levels of symbolic links)",
        "loop_b.wav": f"symlink loop: it points to {linked}/loop_a.wav, which leads back to a link on its own "
                      "path (too many levels of symbolic links)",
        "self.mp3": f"symlink loop: it points to {linked}/self.mp3, which leads back to a link on its own path "
                    "(too many levels of symbolic links)",
        "mounted": f"symlink to a directory: {linked.parent}/store is not followed (directory links can loop or "
                   "list files twice); give it as its own input to process it",
        "up.wav": f"symlink to a directory: {linked} is not followed (directory links can loop or list files "
                  "twice); give it as its own input to process it",
        "pipe.wav": "not a regular file: a FIFO (named pipe)",
        "to_pipe.ogg": f"symlink to something that is not a regular file: {linked}/pipe.wav is a FIFO (named pipe)",
    }
    assert not any("/mounted/" in url or "/up.wav/" in url for url in by_url)  # directory links not walked
    assert not any(url.endswith("notes.txt") for url in by_url)
    dangling = by_url[f"file://{linked}/dangling.wav"]  # versioned by the link itself until the target appears
    assert (dangling.size, dangling.mtime) == (os.lstat(linked / "dangling.wav").st_size,
                                               os.lstat(linked / "dangling.wav").st_mtime)


def test_a_dangling_link_that_gets_its_target_changes_version(linked: Path):
    before = {s.url: s for s in list_audio_sources(str(linked), StorageSpec())}
    (linked.parent / "gone.wav").write_bytes(b"n" * 77)
    after = {s.url: s for s in list_audio_sources(str(linked), StorageSpec())}
    url = f"file://{linked}/dangling.wav"
    assert after[url].rejected is None and after[url].size == 77
    assert after[url].version != before[url].version  # so the next run processes it


def test_input_that_is_itself_a_symlink(linked: Path, tmp_path: Path):
    (tmp_path / "dir_link").symlink_to(linked)
    urls = {s.url for s in list_audio_sources(str(tmp_path / "dir_link"), StorageSpec())}
    assert f"file://{tmp_path}/dir_link/abs.wav" in urls and f"file://{tmp_path}/dir_link/plain.wav" in urls
    (src,) = list_audio_sources(str(linked / "abs.wav"), StorageSpec())
    assert (src.url, src.size, src.mtime, src.rejected) == (f"file://{linked}/abs.wav", 1234, OLD, None)
    with pytest.raises(StorageError, match=f"cannot be read: dangling symlink: target {tmp_path}/gone.wav does not"):
        list_audio_sources(str(linked / "dangling.wav"), StorageSpec())
    with pytest.raises(StorageError, match="cannot be read: symlink loop: it points to"):
        list_audio_sources(str(linked / "loop_a.wav"), StorageSpec())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder whatever its permissions")
def test_unreadable_folder_is_logged_not_silently_dropped(tree: Path, caplog):
    locked = tree / "nested" / "level1"
    locked.chmod(0)
    try:
        with caplog.at_level("WARNING", logger="audiopipe.tasks.discover"):
            urls = [s.url for s in list_audio_sources(str(tree), StorageSpec())]
    finally:
        locked.chmod(0o755)
    assert not any("/nested/level1/" in url for url in urls)
    assert any(f"cannot list {locked}" in r.getMessage() for r in caplog.records)
