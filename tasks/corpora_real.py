"""Stage 0 (labelled corpora): real music and real sounds from Debian's game and media data packages.

In: the packages of ``REAL_PACKAGES`` (name, licence, which files are music and which are sound effects or
environmental sounds, the music's style, whether the whole package is held out for test), fetched once into
a local cache with ``fetch_package`` (``apt-get download`` + ``dpkg-deb -x``, no install). Out: 1-3 s clips,
float32 mono at 16 kHz, cut from those recordings by ``real_clip``: ``music`` or ``effects`` (sound effects
and environmental sounds), labelled ``music`` or ``sound`` in the corpus (``COARSE_LABELS``).

The fetch is a corpus set-up step (``audiopipe synth sounds --real``), never part of a pipeline run. Only
the audio files named by a package's patterns and its ``copyright`` file are kept in the cache.

Splits (``track_split``): a package with ``holdout=True`` is heard only in test, whole; the tracks of every
other package go to train, or to val by a hash of the track path (``VAL_PERCENT``). So the test split holds
real music and real sounds from packages the model never heard. Debian's ``asterisk-*`` packages
(telephony prompts, music on hold) are refused everywhere: they are how audiopipe is judged from outside.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import soundfile as sf
import soxr

from audiopipe.infra.errors import ConfigError
from audiopipe.tasks.corpora_sounds import fit_length

logger = logging.getLogger(__name__)

SR = 16_000
VAL_PERCENT = 10
# Slots added to the sounds corpus' class cycle by ``--real`` (after its 8 synthetic ones): one more synthetic
# speech slot, real music three times, real effects twice. Real recordings are then 5 of 14 clips.
REAL_SLOTS = ("speech", "real-music", "real-music", "real-music", "real-effects", "real-effects")
# With real recordings the corpus has four classes. Telling a synthetic "rain" from a real water recording
# labelled "effects" would teach the model synthetic-vs-real, not what a sound is; the nightly gate needs
# speech vs music vs other sound vs silence. The fine class stays in the row's params ("class").
COARSE_LABELS = {"speech": "speech", "music": "music", "silence": "silence", "noise": "sound", "alarm": "sound",
                 "rain": "sound", "engine": "sound", "clapping": "sound", "effects": "sound"}
FORBIDDEN_PREFIX = "asterisk"
META_FILE = "audiopipe-real.json"
MIN_PEAK_DBFS = -40.0  # clips quieter than this (fades, gaps between effects) are drawn again
MAX_DRAWS = 12
APT_TIMEOUT_S = 900


@dataclass(frozen=True)
class RealPackage:
    """A Debian package with real recordings. Patterns are ``Path.glob`` patterns relative to the extracted
    package root; ``exclude`` names files (by name) left out, e.g. speech in an effects folder."""

    name: str
    licence: str
    music: tuple[str, ...] = ()
    style: str = ""
    effects: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    holdout: bool = False

    def __post_init__(self) -> None:
        if self.name.startswith(FORBIDDEN_PREFIX):
            raise ConfigError(f"{self.name}: Debian's asterisk-* packages are kept out of every corpus.")

    def patterns(self) -> dict[str, tuple[str, ...]]:
        """Patterns by role: ``music`` or ``effects`` (sound effects and environmental sounds)."""
        return {"music": self.music, "effects": self.effects}


_SFX = "usr/share/games/supertux2/sounds/"
# Licences are those debian/copyright gives for the files used (checked 2026-12-05, Debian 12).
REAL_PACKAGES: tuple[RealPackage, ...] = (
    RealPackage("wesnoth-1.16-music", "GPL-2+", music=("usr/share/games/wesnoth/*/data/core/music/*.ogg",),
                style="orchestral film score"),
    RealPackage("warzone2100-music", "GPL-2+ (aftermath album also CC-BY-SA-3.0)",
                music=("usr/share/games/warzone2100/music/**/*.opus",), style="electronic, industrial, ambient"),
    RealPackage("hedgewars-data", "GPL-2 (music; its Data/Sounds are GFDL-1.3 and not used)",
                music=("usr/share/games/hedgewars/Data/Music/*.ogg",),
                style="themed game music: rock, pop, oriental, pirate, jazz, ambient"),
    RealPackage("supertux-data", "GPL-2+ (music), GPL-3+ (sounds)",
                music=("usr/share/games/supertux2/music/*/*.ogg",), style="chiptune, synth pop, orchestral",
                effects=(_SFX + "*.wav", _SFX + "*.ogg"), exclude=("excellent.wav", "welldone.ogg")),
    RealPackage("freedroidrpg-data", "GPL-2+", music=("usr/share/freedroidrpg/data/sound/music/*.ogg",),
                style="electronic, techno, ambient",
                effects=("usr/share/freedroidrpg/data/sound/effects/*.ogg",
                         "usr/share/freedroidrpg/data/sound/effects/bullets/*.ogg",
                         "usr/share/freedroidrpg/data/sound/effects/item_sounds/*.ogg",
                         "usr/share/freedroidrpg/data/sound/effects/bot_sounds/death_sound_*.ogg"),
                exclude=("ThouArtDefeated_Sound_0.ogg",)),
    RealPackage("scorched3d-data", "GPL-2+",
                effects=("usr/share/games/scorched3d/data/globalmods/*/data/wav/*/*.wav",),
                exclude=("fight4life.wav",)),
    RealPackage("frozen-bubble-data", "GPL-2", music=("usr/share/games/frozen-bubble/snd/*zik*.ogg",),
                style="upbeat electronic pop", effects=("usr/share/games/frozen-bubble/snd/*.ogg",)),
    RealPackage("sound-theme-freedesktop", "GPL-2+, CC-BY-3.0, CC-BY-SA-3.0 (per file)",
                effects=("usr/share/sounds/freedesktop/stereo/*.oga",),
                exclude=tuple(f"audio-channel-{s}.oga" for s in (
                    "front-left", "front-right", "front-center", "rear-left", "rear-right", "rear-center",
                    "side-left", "side-right")) + ("audio-test-signal.oga",)),
    RealPackage("tuxpaint-data", "GPL-2+", effects=("usr/share/tuxpaint/sounds/*.wav",),
                exclude=("areyousure.wav", "youcannot.wav", "tuxok.wav")),
    RealPackage("supertuxkart-data", "CC-BY-SA-3.0/4.0, CC-BY-3.0, CC0, GPL-2+/3+, public domain (per file)",
                music=("usr/share/games/supertuxkart/data/music/*.ogg",),
                style="rock, celtic, latin, electronic, orchestral",
                effects=("usr/share/games/supertuxkart/data/sfx/*.ogg",),
                exclude=("sara_airport_pa.ogg", "ugh.ogg", "wee.ogg", "lenautile_restaurant.ogg", "gnu_flute.ogg",
                         "last_lap_fanfare.ogg", "race_finish_victory.ogg", "gp_end.ogg", "track_intro.ogg",
                         "pre_start_race.ogg")),
    RealPackage("megaglest-data", "CC-BY-SA-3.0",
                effects=("usr/share/games/megaglest/tilesets/*/sounds/*.ogg",
                         "usr/share/games/megaglest/tilesets/*/sounds/*.wav",
                         "usr/share/games/megaglest/data/core/water_sounds/*.wav")),
    RealPackage("freecol", "GPL-2+, CC-BY-4.0, CC-BY-SA-3.0 (music, per file)",
                music=("usr/share/games/freecol/default/resources/music/default/*.ogg",
                       "usr/share/games/freecol/default/resources/sound/anthem/*.ogg"),
                style="folk, orchestral, national anthems",
                effects=("usr/share/games/freecol/default/resources/sound/attack/*.ogg",
                         "usr/share/games/freecol/default/resources/sound/event/*.ogg")),
    # Held out whole: heard only in test.
    RealPackage("lincity-ng-data", "GPL-2+", music=("usr/share/games/lincity-ng/music/default/*.ogg",),
                style="blues, ambient electronic", effects=("usr/share/games/lincity-ng/sounds/*.wav",),
                holdout=True),
    RealPackage("extremetuxracer-data", "GPL-2+", music=("usr/share/games/etr/music/*.ogg",),
                style="rock, electronic racing themes", effects=("usr/share/games/etr/sounds/*.wav",),
                holdout=True),
    RealPackage("xmoto-data", "GPL-2+", music=("usr/share/games/xmoto/Textures/Musics/*.ogg",),
                style="electronic, rock", holdout=True),
    RealPackage("minetest-data", "CC-BY-SA-3.0, CC-BY-3.0 (doors)",
                effects=("usr/share/games/minetest/games/minetest_game/mods/*/sounds/*.ogg",), holdout=True),
)


def package_by_name(name: str, packages: Iterable[RealPackage] = REAL_PACKAGES) -> RealPackage:
    """The registered package ``name``.

    Raises:
        ConfigError: for an asterisk-* package or a name not in ``packages``.
    """
    if name.startswith(FORBIDDEN_PREFIX):
        raise ConfigError(f"{name}: Debian's asterisk-* packages are kept out of every corpus.")
    for pkg in packages:
        if pkg.name == name:
            return pkg
    raise ConfigError(f"unknown real-audio package {name!r}; known: {', '.join(p.name for p in packages)}")


def package_files(root: Path, pkg: RealPackage) -> dict[str, list[str]]:
    """``{"music": [...], "effects": [...]}``: sorted paths relative to ``root`` matching ``pkg``'s patterns,
    without excluded names; a file that is music is never also an effect."""
    found: dict[str, list[str]] = {}
    for label, patterns in pkg.patterns().items():
        rels = {p.relative_to(root).as_posix() for pat in patterns for p in root.glob(pat) if p.is_file()}
        found[label] = sorted(r for r in rels if Path(r).name not in pkg.exclude)
    found["effects"] = [r for r in found["effects"] if r not in set(found["music"])]
    return found


def track_split(pkg: RealPackage, rel: str) -> str:
    """``test`` for every track of a held-out package; otherwise ``val`` for ``VAL_PERCENT``% of tracks (by a
    hash of the package and path, so a track never changes split) and ``train`` for the rest."""
    if pkg.holdout:
        return "test"
    return "val" if zlib.crc32(f"{pkg.name}/{rel}".encode()) % 100 < VAL_PERCENT else "train"


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"`{' '.join(cmd)}` took over {APT_TIMEOUT_S} s; check the network or the apt "
                          "proxy.") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ConfigError(f"`{' '.join(cmd)}` failed ({done.returncode}): {' | '.join(tail)}. "
                          "Run `apt-get update` first, or fetch on a machine that reaches Debian's archive.")


def fetch_package(pkg: RealPackage, cache_dir: Path) -> Path:
    """Fetch ``pkg`` into ``cache_dir/<name>`` once: ``apt-get download`` the .deb, ``dpkg-deb -x`` it into
    a temporary folder, keep the audio files its patterns name and its copyright, write ``META_FILE`` last.
    Idempotent: a package whose ``META_FILE`` exists is not fetched again. Nothing is installed.

    Returns:
        The package's cache folder.

    Raises:
        ConfigError: apt-get or dpkg-deb missing, the download or extraction failing (with apt's message),
            or a package whose patterns match no audio (the archive changed).
    """
    dest = Path(cache_dir) / pkg.name
    if (dest / META_FILE).exists():
        return dest
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"cannot fetch {pkg.name}: {', '.join(missing)} not found. Real recordings come from "
                          "Debian packages: fetch them on a Debian/Ubuntu machine, or set AUDIOPIPE_CACHE to a "
                          "cache fetched elsewhere.")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{pkg.name}-", dir=cache_dir) as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # apt's _apt user downloads into it when it can
        _run(["apt-get", "download", "-q", pkg.name], work)
        debs = sorted(work.glob(f"{pkg.name}_*.deb"))
        if not debs:
            raise ConfigError(f"apt-get download {pkg.name} wrote no .deb file")
        _run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], work)
        files = package_files(work / "root", pkg)
        if not files["music"] and not files["effects"]:
            raise ConfigError(f"{debs[0].name}: no file matches the patterns of {pkg.name}; the package changed")
        staged = work / "keep"
        for rel in files["music"] + files["effects"] + [f"usr/share/doc/{pkg.name}/copyright"]:
            if (work / "root" / rel).is_file():
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(work / "root" / rel), staged / rel)
        version = unquote(debs[0].stem.split("_")[1])  # apt writes the epoch colon as %3a
        meta = {"package": pkg.name, "version": version, "licence": pkg.licence, "style": pkg.style,
                "deb": debs[0].name, "num_music": len(files["music"]), "num_effects": len(files["effects"])}
        (staged / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if dest.exists():  # a half-written folder from an interrupted fetch
            shutil.rmtree(dest)
        staged.rename(dest)
    logger.info("fetched %s %s into %s", pkg.name, version, dest)
    return dest


@dataclass(frozen=True)
class RealTrack:
    package: str
    rel: str
    path: str
    label: str
    split: str
    version: str


@dataclass(frozen=True)
class RealPool:
    """Every usable track of the fetched packages, grouped as ``{(label, split): {package: (tracks...)}}``."""

    groups: dict[tuple[str, str], dict[str, tuple[RealTrack, ...]]]
    packages: tuple[RealPackage, ...]

    def tracks(self, label: str, split: str) -> dict[str, tuple[RealTrack, ...]]:
        """The tracks of ``label`` in ``split`` by package.

        Raises:
            ConfigError: when no fetched package has such a track.
        """
        found = self.groups.get((label, split), {})
        if not found:
            raise ConfigError(f"no real {label} tracks for the {split} split among {[p.name for p in self.packages]}")
        return found

    def summary(self) -> dict[str, Any]:
        """Tracks per ``label/split`` and per package (for the corpus report and the docs)."""
        return {f"{label}/{split}": {pkg: len(t) for pkg, t in by_pkg.items()}
                for (label, split), by_pkg in sorted(self.groups.items())}


def load_pool(cache_dir: Path, packages: Iterable[RealPackage] = REAL_PACKAGES) -> RealPool:
    """Index the fetched ``packages`` under ``cache_dir``.

    Raises:
        ConfigError: a package not fetched yet (run ``audiopipe synth sounds --real``, which fetches).
    """
    packages = tuple(packages)
    groups: dict[tuple[str, str], dict[str, list[RealTrack]]] = {}
    for pkg in packages:
        root = Path(cache_dir) / pkg.name
        if not (root / META_FILE).exists():
            raise ConfigError(f"{pkg.name} is not in the real-audio cache {cache_dir}; "
                              "`audiopipe synth sounds OUT --real` fetches it.")
        version = json.loads((root / META_FILE).read_text())["version"]
        for label, rels in package_files(root, pkg).items():
            for rel in rels:
                split = track_split(pkg, rel)
                track = RealTrack(pkg.name, rel, str(root / rel), label, split, version)
                groups.setdefault((label, split), {}).setdefault(pkg.name, []).append(track)
    frozen = {key: {name: tuple(ts) for name, ts in by_pkg.items()} for key, by_pkg in groups.items()}
    return RealPool(frozen, packages)


def read_excerpt(path: str, offset_s: float, duration_s: float) -> tuple[np.ndarray, int]:
    """``duration_s`` seconds from ``offset_s`` of an audio file (seeking, not decoding the whole track),
    downmixed and resampled to 16 kHz (soxr HQ); shorter when the file ends first.

    Returns:
        ``(float32 samples, the file's sample rate)``.
    """
    with sf.SoundFile(path) as f:
        start = min(int(offset_s * f.samplerate), max(0, f.frames - 1))
        f.seek(start)
        x = f.read(int(round(duration_s * f.samplerate)), dtype="float32", always_2d=True)
        rate = f.samplerate
    mono = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)
    if rate != SR and mono.size:
        mono = soxr.resample(mono, rate, SR, quality="HQ")
    return np.nan_to_num(mono).astype(np.float32), rate


def track_seconds(path: str) -> float:
    info = sf.info(path)
    return info.frames / info.samplerate


def real_clip(pool: RealPool, label: str, split: str, duration_s: float, rng: np.random.Generator
              ) -> tuple[np.ndarray, dict[str, Any]]:
    """A clip of ``round(duration_s * 16000)`` samples of real ``label`` audio from ``split``'s tracks.

    Draws a package (weighted by the square root of its number of tracks, so a package of many short files
    does not drown the others, nor a package of three tracks repeat them), a track, and an offset; a track
    shorter than the clip is placed at a random offset in digital silence. Clips whose peak is
    below ``MIN_PEAK_DBFS`` (fades, gaps) are drawn again, up to ``MAX_DRAWS`` times. The clip is then
    scaled to a random peak in 0.1-0.9, as the synthetic classes are, so level says nothing about the class.

    Returns:
        ``(float32 samples, params)`` with ``package``, ``version``, ``track``, ``offset_s``, ``peak``,
        ``source_rate_hz``, ``licence`` and, for music, ``style``.

    Raises:
        ConfigError: no track for ``(label, split)``, or ``MAX_DRAWS`` quiet draws in a row.
    """
    by_pkg = pool.tracks(label, split)
    names = sorted(by_pkg)
    weights = np.sqrt([len(by_pkg[name]) for name in names])
    num = int(round(duration_s * SR))
    for _ in range(MAX_DRAWS):
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        track = by_pkg[name][int(rng.integers(len(by_pkg[name])))]
        length_s = track_seconds(track.path)
        offset_s = round(float(rng.uniform(0, length_s - duration_s)), 3) if length_s > duration_s else 0.0
        x, rate = read_excerpt(track.path, offset_s, duration_s)
        top = float(np.max(np.abs(x))) if x.size else 0.0
        if top > 0 and 20 * np.log10(top) >= MIN_PEAK_DBFS:
            break
    else:
        raise ConfigError(f"{MAX_DRAWS} draws of real {label}/{split} in a row were quieter than {MIN_PEAK_DBFS} dBFS")
    peak = round(float(rng.uniform(0.1, 0.9)), 3)  # as reported, so params reproduce the clip
    clip = fit_length(x * (peak / top), num, rng).astype(np.float32)
    pkg = package_by_name(track.package, pool.packages)
    params = {"package": track.package, "version": track.version, "track": track.rel, "offset_s": offset_s,
              "peak": peak, "source_rate_hz": rate, "licence": pkg.licence}
    return clip, params | ({"style": pkg.style} if label == "music" else {})
