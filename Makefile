# The two commands of the README. Both do all the set-up on a fresh machine (scripts/setup.sh).
.PHONY: demo test setup lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python -m napari_stmap.demo

test: setup
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/python -m pytest -q
