#!/usr/bin/env bash
# Bootstrap the audiopipe development environment (Debian 12 / Python 3.11).
#
#   1. installs the Debian packages the pipeline and its tests need,
#   2. creates .venv if it is missing,
#   3. installs every dependency of every extra from the hashed lock locks/dev.txt (pip --require-hashes),
#      then the project itself, editable, with --no-deps.
#
# Idempotent: when everything is already in place it finishes in about a second.
# The pip step is skipped while .venv/.audiopipe-stamp holds the sha256 of
# pyproject.toml + locks/dev.txt; set AUDIOPIPE_FORCE_INSTALL=1 to force it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${AUDIOPIPE_VENV:-.venv}"
STAMP="$VENV/.audiopipe-stamp"
# festival + festvox-*: the diphone (kal, ked) and HTS (slt) voices of `synth speech` (docs/corpora.md).
# Never asterisk-* (Debian's telephony prompts and hold music): they are how audiopipe is judged from outside.
APT_PACKAGES=(espeak-ng sox flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
              fluidsynth fluid-soundfont-gm fortunes wamerican libsndfile1)

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------
# 1. System packages
# --------------------------------------------------------------------------
pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${APT_PACKAGES[@]}"; do
        pkg_installed "$pkg" || missing+=("$pkg")
    done
else
    log "dpkg not found (not a Debian-based system?); skipping system packages:"
    log "  make sure these are installed: ${APT_PACKAGES[*]}"
fi

if ((${#missing[@]})); then
    log "missing system packages: ${missing[*]}"
    apt_cmd=(apt-get)
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            apt_cmd=(sudo -n apt-get)
        elif command -v sudo >/dev/null 2>&1 && [[ -t 0 ]]; then
            log "using sudo (it may ask for your password)"
            apt_cmd=(sudo apt-get)
        else
            {
                echo "[bootstrap] ERROR: these system packages are missing: ${missing[*]}"
                echo "[bootstrap] and this user cannot install them (not root, and no usable sudo)."
                echo "[bootstrap] Run as root, then re-run this script:"
                echo "    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
            } >&2
            exit 1
        fi
    fi

    # Refresh the package lists only when they are absent, older than a day,
    # or do not know one of the packages; otherwise install straight away.
    need_update=0
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        need_update=1
    elif [[ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin +1440 -print -quit 2>/dev/null)" ]]; then
        need_update=1
    else
        for pkg in "${missing[@]}"; do
            cand="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
            if [[ -z "$cand" || "$cand" == "(none)" ]]; then need_update=1; break; fi
        done
    fi

    apt_install() {
        DEBIAN_FRONTEND=noninteractive "${apt_cmd[@]}" install -y -qq --no-install-recommends "${missing[@]}"
    }
    if ((need_update)); then
        log "apt-get update"
        "${apt_cmd[@]}" update -qq
    fi
    log "apt-get install ${missing[*]} (fluid-soundfont-gm alone is ~120 MB to download)"
    if ! apt_install; then
        if ((need_update)); then
            die "apt-get install failed for: ${missing[*]}"
        fi
        log "install failed; refreshing the package lists and trying once more"
        "${apt_cmd[@]}" update -qq
        apt_install || die "apt-get install failed for: ${missing[*]}"
    fi
fi

# --------------------------------------------------------------------------
# 2. Virtual environment
# --------------------------------------------------------------------------
py_ok() {  # python >= 3.11 and < 3.13 (pyproject: requires-python = ">=3.11,<3.13")
    "$1" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' 2>/dev/null
}

if [[ -x "$VENV/bin/python" ]] && ! py_ok "$VENV/bin/python"; then
    die "$VENV uses $("$VENV/bin/python" -V 2>&1), but audiopipe needs Python 3.11 or 3.12; remove $VENV and re-run"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    PY=""
    for cand in "${PYTHON:-}" python3.11 python3.12 python3; do
        [[ -n "$cand" ]] || continue
        if command -v "$cand" >/dev/null 2>&1 && py_ok "$cand"; then PY="$cand"; break; fi
    done
    if [[ -z "$PY" ]]; then
        found="$(python3 -V 2>&1 || echo 'no python3')"
        die "need Python 3.11 or 3.12 (found: $found). On Debian 12: apt-get install python3 python3-venv"
    fi
    # Debian's own python3 ships `venv` without ensurepip; that lives in python3-venv.
    if ! "$PY" -c 'import ensurepip' 2>/dev/null && [[ "$(id -u)" -eq 0 ]] \
        && [[ "$(command -v "$PY")" == /usr/bin/* ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing python3-venv (needed by $(command -v "$PY") -m venv)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv; }
    fi
    log "creating $VENV with $(command -v "$PY") ($("$PY" -V 2>&1))"
    if ! "$PY" -m venv "$VENV"; then
        rm -rf "$VENV"
        die "'$PY -m venv' failed; on Debian install the venv module: apt-get install python3-venv"
    fi
    rm -f "$STAMP"
    # The pip bundled with Python 3.11 (23.x) is slow and noisy with this machine's
    # local package indexes; a current one resolves the same pins quietly.
    "$VENV/bin/python" -m pip install -q --upgrade pip \
        || log "warning: could not upgrade pip; continuing with $("$VENV/bin/python" -m pip --version)"
fi

# --------------------------------------------------------------------------
# 3. Python packages
# --------------------------------------------------------------------------
LOCK=locks/dev.txt
[[ -f "$LOCK" ]] || die "$LOCK is missing; it is part of the repository (regenerate it with 'make lock')"
# `make lock` ends by running this script, so .venv follows a regenerated lock.
want="$(cat pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"

if [[ "$want" == "$have" && -z "${AUDIOPIPE_FORCE_INSTALL:-}" ]]; then
    log "$VENV is up to date"
else
    # Every package at the version and sha256 of the lock; then audiopipe itself (editable), adding nothing.
    log "installing $LOCK into $VENV (pip --require-hashes), then audiopipe (editable, --no-deps)"
    "$VENV/bin/python" -m pip install -q --require-hashes -r "$LOCK"
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    printf '%s\n' "$want" >"$STAMP"
    log "done"
fi
