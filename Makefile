# The two commands: `make demo` runs the embedded search, `make test` runs the suite
# (`make test-fast` leaves out the tests marked slow, a minute or more each: Ray clusters, demos,
# notebooks, the wheel install, the browser check, runs killed and resumed).
# Each creates or reuses .venv and installs what it needs; both are safe to run again.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The local CPU wheel on CPU machines; on a GPU machine the same pin takes PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.evomerge-installed
# The exact versions the suite was last run with (pip constraints); pyproject.toml keeps ranges.
LOCK := requirements/lock.txt
EXTRAS := dev,cluster,serve,mergekit,datasets,lmeval
# A second environment with the newest releases the ranges admit (make test-latest, make lock).
LATEST := .venv-latest
PYTEST := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q

.PHONY: demo demo-lm test test-fast test-latest lock bench clean

# Extras: cluster (the Ray job server the tests submit to), serve (the reference model service),
# mergekit (the export cross-check), datasets (hf: fitness data), lmeval (lm-eval tasks as fitness).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The demo's config ships in the package; `evomerge demo` copies it to runs/digits.yaml.
demo: $(STAMP)
	$(BIN)/evomerge demo

# A tiny Llama base, an addition and a reversal specialist, merged on Ray workers (CPU, minutes).
demo-lm: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/evomerge demo lm

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(PYTEST); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The quick loop while working: everything but the tests marked slow (CI runs them all).
test-fast: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(PYTEST) -m "not slow"

# The suite against the newest releases pyproject's ranges admit, in its own environment, so a
# breaking release is found on purpose rather than by a red CI. Rebuilt from scratch each time.
$(LATEST)/.resolved: pyproject.toml
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	touch $@

test-latest:
	rm -f $(LATEST)/.resolved
	$(MAKE) $(LATEST)/.resolved
	PATH=$(CURDIR)/$(LATEST)/bin:$$PATH $(PYTEST)

# Write the newest resolution into the lock; then run make test (it reinstalls from the lock).
lock:
	rm -f $(LATEST)/.resolved
	$(MAKE) $(LATEST)/.resolved
	{ echo "# The exact versions make demo and make test install (pip constraints), last resolved"; \
	  echo "# on $$(date -u +%Y-%m-%d) with $$($(LATEST)/bin/python -V). Refresh with make lock (see README)."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^-e'; } > $(LOCK)

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_throughput.py --json

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache
