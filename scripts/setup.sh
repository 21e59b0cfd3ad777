#!/usr/bin/env bash
# Set up ramcli on a fresh machine: a virtual environment with everything, and ExifTool.
# Idempotent: a second run only checks. Used by `make setup` (and so by `make test` and CI).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null

# torch first, on its own: where a local wheel cache caps the version (as on the project's
# machines), pip takes it from disk; elsewhere the newest release in range.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch>=2.3" "torchvision>=0.18"
fi
.venv/bin/python -m pip install -q -e '.[train,test]'

# System tools: ExifTool (metadata writing) and Chromium (the gallery test).
need=()
command -v exiftool >/dev/null || need+=(libimage-exiftool-perl)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "Please install: ${need[*]}" >&2
    echo "  ExifTool: Debian/Ubuntu 'apt install libimage-exiftool-perl', macOS 'brew install exiftool'," >&2
    echo "  Windows: https://exiftool.org (put exiftool.exe on PATH)." >&2
  fi
fi
echo "ramcli is set up: .venv/bin/ramcli doctor"
