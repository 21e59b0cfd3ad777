# Two commands do everything on a fresh machine:
#   make tag PHOTOS=~/Pictures   set up what tagging needs, then tag a folder tree
#   make test                    set up with the test extras, then run the whole test suite (what CI runs)
PHOTOS ?= $(HOME)/Pictures
.PHONY: setup setup-test tag test smoke docs bench first-run

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

tag: setup
	.venv/bin/ramcli tag "$(PHOTOS)"

test: setup-test
	.venv/bin/python -m pytest -q -p no:cacheprovider

# A bare `pip install .` (no extras) in its own venv: every command's --help, and tagging a photo.
smoke:
	bash scripts/smoke.sh

# docs/cli.md from the commands' own help (a test checks it is current).
docs: setup
	.venv/bin/python scripts/cli_docs.py > docs/cli.md

# Every benchmark but first_run.py, which builds its own environment (several GB).
bench: setup-test
	for b in bench/*.py; do [ "$$b" = bench/first_run.py ] || .venv/bin/python $$b || exit 1; done

# A new user's set-up timed: fresh clone, venv, bare `pip install .`, first `ramcli tag`.
first-run:
	python3 bench/first_run.py
