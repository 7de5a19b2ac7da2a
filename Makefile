# The two commands: `make demo` runs the embedded search, `make test` runs the suite.
# Each creates or reuses .venv and installs what it needs; both are safe to run again.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The local CPU wheel on CPU machines; on a GPU machine the same pin takes PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.evomerge-installed

.PHONY: demo demo-lm test bench clean

# Extras: cluster (the Ray job server the tests submit to), serve (the reference model service),
# mergekit (the export cross-check), datasets (hf: fitness data).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,cluster,serve,mergekit,datasets]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/evomerge demo --config configs/demo.yaml

# A tiny Llama base, an addition and a reversal specialist, merged on Ray workers (CPU, minutes).
demo-lm: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/evomerge demo --config configs/demo-lm.yaml

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_throughput.py --json

clean:
	rm -rf $(VENV) runs .pytest_cache
