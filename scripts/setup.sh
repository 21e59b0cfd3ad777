#!/usr/bin/env bash
# Set up ramcli in ./.venv: what tagging needs, nothing more.
#
#   scripts/setup.sh          ramcli and its dependencies (CPU-only torch where there is no NVIDIA GPU)
#   scripts/setup.sh --test   also the test and training extras, and Chromium for the gallery test
#   scripts/setup.sh --bare   `pip install .` alone, as a user would (CI's smoke test, in RAMCLI_VENV)
#
# RAMCLI_VENV names the virtual environment (default .venv).
#
# Idempotent: a second run only checks. System packages (ExifTool; Chromium with --test) are
# installed with apt-get only when running as root on Debian/Ubuntu, and only after saying so;
# RAMCLI_NO_APT=1 turns that off. Elsewhere the script prints what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
test_extras=0
[ "$mode" = "--test" ] && test_extras=1
VENV=${RAMCLI_VENV:-.venv}

PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip install -q "$@"; }

# torch first, on its own. Without an NVIDIA GPU the CPU wheels (a few hundred MB instead of
# several GB of CUDA libraries) from PyTorch's own index; a local wheel cache that caps the
# version (as on the project's machines) is used either way.
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  cpu_index=https://download.pytorch.org/whl/cpu
  if ! command -v nvidia-smi >/dev/null 2>&1 &&
     "$VENV/bin/python" -c "import socket; socket.create_connection(('download.pytorch.org', 443), timeout=3)" 2>/dev/null; then
    pip --extra-index-url "$cpu_index" "torch>=2.3" "torchvision>=0.18"
  else  # a GPU, or PyTorch's index out of reach: the default wheels (or the local cache's)
    pip "torch>=2.3" "torchvision>=0.18"
  fi
fi
if [ "$test_extras" = 1 ]; then
  pip -e '.[train,eval,test]'
elif [ "$mode" = "--bare" ]; then
  pip .
else
  pip -e .
fi

# System tools: ExifTool writes the metadata; Chromium renders the gallery in its test.
need=()
command -v exiftool >/dev/null || need+=(libimage-exiftool-perl)
[ "$test_extras" = 1 ] && ! command -v chromium >/dev/null && need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ -z "${RAMCLI_NO_APT:-}" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing with apt-get: ${need[*]} (RAMCLI_NO_APT=1 skips this)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "Please install: ${need[*]}" >&2
    echo "  ExifTool: Debian/Ubuntu 'apt install libimage-exiftool-perl', macOS 'brew install exiftool'," >&2
    echo "  Windows: https://exiftool.org (put exiftool.exe on PATH)." >&2
  fi
fi
echo "ramcli is set up: $VENV/bin/ramcli doctor"
