#!/usr/bin/env bash
# Installs everything the tests need into .venv (a CPU build of torch first, so that
# stable-baselines3 does not pull a CUDA build) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && ! command -v Xvfb >/dev/null && [ "$(id -u)" = 0 ]; then
  # A real X server for the play-window tests (optional: they fall back to SDL's dummy driver).
  (apt-get install -y -q xvfb xdotool x11-utils >/dev/null 2>&1 || \
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q xvfb xdotool x11-utils >/dev/null 2>&1)) || \
   echo "note: could not install Xvfb; window tests use the SDL dummy driver only"
fi
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" SDL_AUDIODRIVER=dummy
.venv/bin/python -m pytest -q "$@"
