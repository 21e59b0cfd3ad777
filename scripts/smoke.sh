#!/usr/bin/env bash
# CI's install check: `pip install .` without extras into its own venv, then every command's
# --help and tagging a photo with it (scripts/smoke.py). torch comes from the same place as
# scripts/setup.sh takes it (a local wheel cache where there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAMCLI_VENV=${RAMCLI_VENV:-.venv-bare}
bash scripts/setup.sh --bare
bin=$(cd "$RAMCLI_VENV" && pwd)/bin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp scripts/smoke.py tests/ckpt_factory.py tests/official_reference.py "$work/"
# Run from the copy: the installed package is the one imported, not the source tree.
(cd "$work" && RAMCLI_HOME="$work/home" "$bin/python" smoke.py "$bin/ramcli")
