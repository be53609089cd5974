# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: train test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# DeepSpeed's CPU ops, compiled here rather than in the middle of the first run.
	$(PY) -m parallel.prebuild_ops
	touch $@

train: $(STAMP)
	$(VENV)/bin/pretrain $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The edit-test loop: every test that starts no process (the `slow` marker, pyproject.toml).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# CPU benchmarks; each prints its ratio against a reference measured in the same run
# (results and the machines they ran on: docs/benchmarks.md). The GPU one is run by hand.
bench: $(STAMP)
	$(PY) -m bench.cpu_throughput
	$(PY) -m bench.step_overhead
	$(PY) -m bench.data_preprocess
	$(PY) -m bench.data_loader
	$(PY) -m bench.checkpoint_io
	$(PY) -m bench.plan_cpu
	$(PY) -m bench.plan_published
	$(PY) -m bench.moe

clean:
	rm -rf runs .cache .pytest_cache
