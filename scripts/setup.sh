#!/usr/bin/env bash
# One-time (idempotent) set-up for napari-stmap on a fresh machine:
#   1. system packages for a headless Qt/OpenGL viewer (Debian/Ubuntu apt; skipped when present)
#   2. a virtualenv in .venv with the package, its viewer extra and the test tools
# PyTorch: without an NVIDIA GPU we pin the CPU build (constraints-cpu.txt) so pip does not pull
# several GB of CUDA wheels. Set STMAP_TORCH=cuda to let pip choose a CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
APT_PKGS="xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 \
libxcb-image0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libdbus-1-3 libfontconfig1 libglib2.0-0"

install_system_packages() {
  command -v Xvfb >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || { echo "setup: no Xvfb and no apt-get; install Xvfb + libxcb/libGL by hand" >&2; return 0; }
  local SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing system packages for the headless viewer (apt)"
  $SUDO apt-get install -y -q $APT_PKGS >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $APT_PKGS >/dev/null; }
}

install_python_packages() {
  local stamp="$VENV/.stmap-installed"
  local want
  want=$(cat pyproject.toml constraints-cpu.txt | sha1sum | cut -c1-40)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  local constraint=(-c constraints-cpu.txt)
  if [ "${STMAP_TORCH:-}" = "cuda" ]; then constraint=(); fi
  echo "setup: installing napari-stmap into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q "${constraint[@]}" -e ".[all,spatialdata,testing]"
  echo "$want" > "$stamp"
}

install_system_packages
install_python_packages
