# kscan: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# Optional wheel index for torch (a CUDA build, say); empty uses PyPI and the local wheel cache.
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo demo-physics lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install -e ".[dev,bench]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The demo: three simulated volumes (two as k-space, one as NIfTI and as DICOM) through the
# whole workflow (workflows/): undersampling, reconstruction, segmentation, metrics, HTML report.
# Rerunning does nothing; an interrupted run, run again, finishes.
DEMO_DIR ?= demo
SNAKEMAKE := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" "$(CURDIR)/$(VENV)/bin/snakemake"

demo: setup $(DEMO_DIR)/samples.tsv
	$(VENV)/bin/kscan simulate $(DEMO_DIR)/data --volumes 3 --slices 4 --kspace-size 160,128 \
		--recon-size 128,128 --coils 4 --seed 20 --quiet
	# --unlock first: a demo killed with SIGKILL leaves Snakemake's lock behind (run one demo at a time).
	cd $(DEMO_DIR) && $(SNAKEMAKE) -s "$(CURDIR)/workflows/Snakefile" \
		--configfile "$(CURDIR)/workflows/config/demo.yaml" --unlock --quiet all >/dev/null
	cd $(DEMO_DIR) && $(SNAKEMAKE) -s "$(CURDIR)/workflows/Snakefile" \
		--configfile "$(CURDIR)/workflows/config/demo.yaml" --cores 2
	@echo "report: $(DEMO_DIR)/results/report.html"

$(DEMO_DIR)/samples.tsv: workflows/config/demo_samples.tsv
	mkdir -p $(DEMO_DIR) && cp $< $@

# The physics demo: simulate, undersample and reconstruct a phantom; print the metrics.
demo-physics: setup
	$(VENV)/bin/kscan demo

bench: setup
	$(VENV)/bin/kscan bench physics

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
