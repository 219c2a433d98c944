#!/usr/bin/env bash
# Plays the bundled ViZDoom world model headless and writes a video (demo.mp4 unless told otherwise:
# the arguments are `matrixgame-env demo`'s). On first use it installs the package with its [play]
# extra into .venv, with torch from the package index unless .venv already has one.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch
.venv/bin/python -c "import matrixgame_env, imageio_ffmpeg" 2>/dev/null || .venv/bin/pip install -q -e ".[play]"
[ $# -gt 0 ] || set -- --out demo.mp4
exec .venv/bin/matrixgame-env demo "$@"
