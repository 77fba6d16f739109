# The two commands: `make run` (the main job on KOP) and `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
BACKBONE ?= efficientnet_lite0
SEED   ?= 0
OUT    ?= runs/make-run
STAMP  := $(VENV)/.installed

.PHONY: run test docs venv clean browser-deps test-browser screenshot load-test bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision are pinned here to the releases this machine keeps on local disk, so the
# install takes a minute instead of a multi-GB download; pyproject.toml allows a range.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,ray,pacs]'
	touch $(STAMP)

venv: $(STAMP)

# The paper protocol end to end: audit, leakage-safe split, train (5x offline augmentation,
# frozen backbone, early stopping), then score the held-out test set and print the metrics.
run: $(STAMP)
	$(BIN)/kneeosteo audit $(DATA) --out $(OUT)/audit
	$(BIN)/kneeosteo split $(DATA) --out $(OUT)/split.json --seed $(SEED)
	$(BIN)/kneeosteo train $(DATA) --config configs/paper.toml --split $(OUT)/split.json --backbone $(BACKBONE) --seed $(SEED) --out $(OUT)/$(BACKBONE)-seed$(SEED)

# Two pytest-xdist workers (one compute thread each; tests/conftest.py's scheduler keeps each module
# on one worker and hands out the longest groups first). TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or anchor fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(OUT) .pytest_cache

# Debian's Chromium for the browser test (Playwright drives it; never `playwright install`).
browser-deps:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test-browser: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q tests/test_browser.py

screenshot: $(STAMP) browser-deps
	KNEEOSTEO_UPDATE_SCREENSHOT=1 $(BIN)/python -m pytest -q tests/test_browser.py

load-test: $(STAMP)
	$(BIN)/python benchmarks/load_test.py $(if $(RUN),--run $(RUN))

# Benchmarks (not part of `make test`); writes docs/results/benchmarks/*.json and RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python benchmarks/bench_am_step.py
