# The two quickstart commands: `make serve` and `make test`. Both build .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck unit bench clean dist dist-zipapp dist-binary dist-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/mailfence serve

lint: $(STAMP)
	$(BIN)/ruff check mailfence tests benchmarks
	$(BIN)/ruff format --check mailfence tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

# Binaries: dist/mailfence.pyz (shiv; runs on a Python of the venv's minor version, 3.11,
# because it carries compiled wheels, and unpacks them into ~/.shiv or $SHIV_ROOT on first
# start) and dist/mailfence (PyInstaller one-file; needs no Python, unpacks into $TMPDIR at
# each start). dist-check runs both as an operator would, three starts each.
DIST_STAMP := $(VENV)/.installed-dist

$(DIST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,dist]'
	touch $(DIST_STAMP)

dist: dist-zipapp dist-binary

dist-zipapp: $(STAMP)
	rm -rf build/lib build/bdist.*   # setuptools would package stale files left there
	mkdir -p dist
	$(BIN)/shiv --entry-point mailfence.cli:main --python '/usr/bin/env python3' \
		--compressed --reproducible --output-file dist/mailfence.pyz --quiet .

dist-binary: $(DIST_STAMP)
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN --distpath dist \
		--workpath build/pyinstaller packaging/mailfence.spec

dist-check: dist
	$(BIN)/python tests/test_zipapp.py dist/mailfence.pyz dist/mailfence

clean:
	rm -rf $(VENV) build dist *.egg-info
