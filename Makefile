# Two commands do all set-up: `make train` and `make test` each create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test test-fast bench clean

$(BIN)/.installed: pyproject.toml requirements-ci.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-ci.txt
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/python train.py $(ARGS)

# Two test files at a time (pytest-xdist): most tests wait on processes they start, so the
# suite keeps both cores busy. A file's tests stay together (its module fixtures run once).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

bench: setup
	mkdir -p outputs/bench
	$(BIN)/macfleet benchmark --type bandwidth --json outputs/bench/bandwidth.json
	$(BIN)/macfleet benchmark --type allreduce --nodes 2 --json outputs/bench/allreduce2.json
	$(BIN)/macfleet benchmark --type allreduce --nodes 3 --json outputs/bench/allreduce3.json
	$(BIN)/macfleet benchmark --type allreduce --nodes 4 --json outputs/bench/allreduce4.json
	$(BIN)/macfleet benchmark --type compression --json outputs/bench/compression.json
	$(BIN)/macfleet benchmark --type scaling --nodes 2 --json outputs/bench/scaling.json --plot outputs/bench/scaling.png
	$(BIN)/macfleet benchmark --type convergence --nodes 2 --json outputs/bench/convergence.json --plot outputs/bench/convergence.png
	$(BIN)/macfleet benchmark --type elastic --nodes 2 3 --json outputs/bench/elastic.json --plot outputs/bench/elastic.png

clean:
	rm -rf $(VENV) outputs/* multirun
