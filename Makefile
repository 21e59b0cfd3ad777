# Two commands do everything on a fresh machine:
#   make tag PHOTOS=~/Photos   set up, then tag a folder tree
#   make test                  set up, then run the whole test suite (what CI runs)
PHOTOS ?= $(HOME)/Pictures
.PHONY: setup tag test bench

setup:
	bash scripts/setup.sh

tag: setup
	.venv/bin/ramcli tag "$(PHOTOS)"

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: setup
	for b in bench/*.py; do .venv/bin/python $$b || exit 1; done
