# The two commands the README promises: `make test` and `make sweep`.
# Both set everything up from a fresh clone.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-tensorflow test-jax test-torch test-ui test-multiprocess test-all chromium postgresql team-server sweep ui lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The whole suite on TensorFlow (the default backend), then the core
# numerical tests (marker `core`) on JAX (x64) and PyTorch, and the XLA and
# mixed-precision checks (marker `deploy`) on JAX. Tests that start other
# processes (marker `multiprocess`: tf.distribute, JAX DataParallel, concurrent
# sweeps, real `mlflow server`s, the experiment scripts) take minutes:
# `make test-multiprocess` runs them, and CI (.ci/run) runs both.
# `make test-all` is the same as CI.
test: setup lint test-tensorflow test-jax test-torch test-ui

test-all: test test-multiprocess

# Two pytest workers, one per core (tests are short and mostly single-threaded); a test
# file stays on one worker, so module fixtures (the short sweep) run once.
PYTEST_WORKERS ?= 2

test-tensorflow: setup
	KERAS_BACKEND=tensorflow $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not ui and not multiprocess"

# Each of these starts its own processes (a server, or two training processes at most; the shared-study tests
# start PostgreSQL and an MLflow server with auth, and three workers).
test-multiprocess: setup postgresql
	KERAS_BACKEND=tensorflow $(PY) -m pytest -m multiprocess

# The MLflow UI checked in headless Chromium (Debian's package, installed here if missing).
test-ui: setup chromium
	KERAS_BACKEND=tensorflow $(PY) -m pytest -m ui

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the UI test"; \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Debian's PostgreSQL, for `make team-server` and the shared-study tests (installed here if missing).
postgresql:
	@test -n "$$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null)" || command -v pg_ctl >/dev/null 2>&1 || { \
		echo "Installing Debian's postgresql for the team server"; \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

# PostgreSQL (Optuna's studies) and an MLflow server with basic auth, on this machine, until Ctrl-C; it prints
# the workers' command (`keras-l2 sweep --study ...`) and where the generated credentials are.
TEAM_DIR ?= $(CURDIR)/mlruns/team
team-server: setup postgresql
	$(VENV)/bin/keras-l2 team-server --dir "$(TEAM_DIR)" --host $(UI_HOST) --port $(UI_PORT)

test-jax: setup
	KERAS_BACKEND=jax JAX_ENABLE_X64=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "core or deploy"

test-torch: setup
	KERAS_BACKEND=torch $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m core

lint: setup
	$(PY) -m ruff check keras_l2 tests experiments

# The main job: the default lambda sweep on the digits, into the embedded
# store (mlruns/), plots into experiments/results/ (ignored by git: the
# README's copies are in docs/images/).
sweep: setup
	KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 $(PY) experiments/sweep.py --results-dir experiments/results $(SWEEP_ARGS)
	@echo "Plots: experiments/results/*.png   MLflow UI: make ui"

# The MLflow UI over the embedded store (mlruns/), on this machine only.
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
UI_STORE ?= $(CURDIR)/mlruns
ui: setup
	@mkdir -p "$(UI_STORE)/artifacts"
	@echo "MLflow UI for $(UI_STORE) at http://$(UI_HOST):$(UI_PORT) (Ctrl-C stops it)"
	$(VENV)/bin/mlflow ui --backend-store-uri "sqlite:///$(UI_STORE)/mlflow.db" \
		--default-artifact-root "$(UI_STORE)/artifacts" --host $(UI_HOST) --port $(UI_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
