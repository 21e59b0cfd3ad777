#!/usr/bin/env bash
# CI's install check: `pip install .` without extras into its own venv, then every command's
# --help and tagging a photo with it (scripts/smoke.py), then a new user's first ten minutes
# (scripts/first_minutes.py). torch comes from the same place as
# scripts/setup.sh takes it (a local wheel cache where there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAMCLI_VENV=${RAMCLI_VENV:-.venv-bare}
bash scripts/setup.sh --bare
bin=$(cd "$RAMCLI_VENV" && pwd)/bin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp scripts/smoke.py scripts/first_minutes.py tests/ckpt_factory.py tests/official_reference.py README.md "$work/"
# Run from the copy: the installed package is the one imported, not the source tree.
(cd "$work" && RAMCLI_HOME="$work/home" "$bin/python" smoke.py "$bin/ramcli")
mkdir "$work/walk" && cp "$work"/{first_minutes.py,ckpt_factory.py,official_reference.py,README.md} "$work/walk/"
(cd "$work/walk" && "$bin/python" first_minutes.py "$bin/ramcli")
