# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow install bench clean

$(BIN)/retrain: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[serve,test,labels,ray]"
	touch $(BIN)/retrain

install: $(BIN)/retrain

# Train on the 60 example photos, then label two photos it never saw.
demo: install
	$(BIN)/retrain fit examples/flowers --output runs/demo
	$(BIN)/retrain label runs/demo examples/unseen/daisy/10555815624_dc211569b0.jpg examples/unseen/roses/12240303_80d87f77a3_n.jpg

# The everyday suite (a few minutes), in two pytest-xdist workers: most tests wait on a retrain
# process they started, so two run side by side on 2 cores in 0.77x the time. `make test-slow`
# runs the slow tests (fine-tuning, the flowers, the Ray cluster, load tests) one at a time, which
# CI runs too (.ci/run).
test: install
	$(BIN)/python -m pytest -q -n 2 -m "not gpu and not slow" tests

test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not gpu" tests

bench: install
	$(BIN)/python benchmarks/bench_fit.py

clean:
	rm -rf runs .pytest_cache
