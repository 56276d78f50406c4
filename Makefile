# Two commands: `make run` and `make test`. Everything else is a helper.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser perf-analyzer label-studio run train test test-fast lint audit format clean demo-loop demo-shadow

$(STAMP): pyproject.toml constraints.txt requirements/no-deps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/no-deps.txt
	@touch $(STAMP)

install: $(STAMP) ## Create the virtual environment and install the project (once).

browser: ## Debian's Chromium, for the review page's tests (installed once with apt-get).
	@test -x $(CHROMIUM) || { echo "installing Debian's chromium for the browser tests"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

perf-analyzer: install ## NVIDIA's perf_analyzer under var/tools, for the tests that run it (fetched once).
	$(BIN)/python -m harness.perf_analyzer

label-studio: install ## Label Studio in an environment of its own under var/tools, for the test that connects it (installed once, about 1 GB).
	$(BIN)/python -m harness.label_studio

run: install ## Train the default model if the store has none, then serve it.
	$(BIN)/loop serve

train: install ## Train the default model again (a new version in the store).
	$(BIN)/loop train

demo-loop: install ## Measure how much review improves a model (both strategies, about 5 minutes).
	$(BIN)/loop demo-loop

demo-shadow: install ## Show a shadow judged by reviewers catching the candidate the frozen-set gate would wrongly promote (about 2 minutes).
	$(BIN)/loop demo-shadow

test: install browser perf-analyzer label-studio ## Unit, model, API, integration and browser tests.
	BENTOML_DO_NOT_TRACK=True $(BIN)/pytest

test-fast: install ## Unit and API tests only: the quick round while developing (make test is the whole suite).
	BENTOML_DO_NOT_TRACK=True $(BIN)/pytest -m "unit or api" -q

lint: install ## ruff check, ruff format --check, mypy.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

audit: install ## Known vulnerabilities of the pinned dependencies (pip-audit; needs PyPI's JSON API or OSV).
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --requirement constraints.txt --no-deps --disable-pip --progress-spinner off

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
