# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKEMAKE := PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/snakemake
CORES ?= 2

.PHONY: setup sysdeps tiny demo test test-fast test-miniature lint clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(PY) -m pip install -q torch==2.13.0
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -r requirements/dev.txt -e . torch==2.13.0
	touch $@

# espeak-ng and sox synthesise the test speech; chromium and chromium-driver run the browser tests of the
# report and the listening page (Debian packages; needs root or sudo). Without chromium those tests skip.
sysdeps:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null || { \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng sox >/dev/null; }
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "sysdeps: chromium could not be installed; the browser tests will skip"; }

tiny: setup sysdeps
	$(PY) -m emotion_neurons.tiny --out .tiny

demo: tiny
	$(SNAKEMAKE) --cores $(CORES) --configfile config/demo.yaml --show-failed-logs
	$(SNAKEMAKE) --cores $(CORES) --configfile config/demo.yaml config/demo-seed1.yaml --show-failed-logs
	$(SNAKEMAKE) --cores $(CORES) --configfile config/demo.yaml config/demo-seed2.yaml --show-failed-logs
	$(SNAKEMAKE) --cores $(CORES) --configfile config/demo.yaml config/demo-evc.yaml --show-failed-logs
	$(SNAKEMAKE) --cores $(CORES) --configfile config/demo.yaml config/demo-af3.yaml --show-failed-logs
	@echo "Reports: $$(pwd)/results/demo{,-seed1,-seed2}/report.html (miniature Qwen2.5-Omni, SER, training seeds 0-2)"
	@echo "         $$(pwd)/results/demo-evc/report.html (miniature Qwen2.5-Omni, EVC; untrained speech decoder)"
	@echo "         $$(pwd)/results/demo-af3/report.html (random tiny Audio Flamingo 3, SER)"

test: setup sysdeps
	$(PY) -m pytest -q -ra

# the slow miniature tests, training the miniatures first if their recipe changed (13-25 min on 2 cores)
test-miniature: setup sysdeps
	EMOTION_NEURONS_TRAIN_MINIATURE=1 $(PY) -m pytest -q -ra tests/test_miniature.py

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	$(SNAKEMAKE) --lint --configfile config/demo.yaml

clean-demo:
	rm -rf results/demo results/cache .snakemake
