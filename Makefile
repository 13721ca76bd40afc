# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when
# missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

# One home for everything started from here: `make demo` writes it, `make ui` shows its
# MLflow registry, `make serve` publishes deployments whose form defaults to it.
DEMO_DIR ?= $(CURDIR)/demo-data
LLMREC_HOME ?= $(DEMO_DIR)/home
export LLMREC_HOME
LANDING ?= $(DEMO_DIR)/landing
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
UI_DIR := $(CURDIR)/.ui

STACK_DIR ?= $(CURDIR)/.stack

.PHONY: install demo test test-fast bench bench-quality bench-serving ui ui-stop serve clean-venv postgres stack stack-stop

install: $(VENV)/.installed

# torch first, pinned to the CPU build on disk here; a user who installed a CUDA torch
# into the venv beforehand keeps it (pyproject accepts a range).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/llmrec demo --workdir $(DEMO_DIR) --home $(LLMREC_HOME)

test: install postgres
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/score_throughput.py
	$(PY) benchmarks/incremental_vs_full.py

bench-quality: install
	$(PY) benchmarks/quality.py

# Serving: compression variants, then llmrec api vs mlflow models serve under load (127.0.0.1).
bench-serving: install
	$(PY) benchmarks/serving_compression.py
	$(PY) benchmarks/serving_load.py

# Prefect server and MLflow UI on 127.0.0.1, each in its own process group (pids in .ui/),
# so `make ui-stop` stops them with every child they spawned.
ui: install
	mkdir -p $(UI_DIR) $(LLMREC_HOME)
	PREFECT_HOME=$(UI_DIR)/prefect setsid sh -c 'echo $$$$ > $(UI_DIR)/prefect.pid; exec $(VENV)/bin/prefect server start \
		--host 127.0.0.1 --port $(PREFECT_PORT) --analytics-off' > $(UI_DIR)/prefect.log 2>&1 < /dev/null &
	setsid sh -c 'echo $$$$ > $(UI_DIR)/mlflow.pid; exec $(VENV)/bin/mlflow server --backend-store-uri \
		sqlite:///$(LLMREC_HOME)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1' > $(UI_DIR)/mlflow.log 2>&1 < /dev/null &
	@for url in http://127.0.0.1:$(PREFECT_PORT)/api/health http://127.0.0.1:$(MLFLOW_PORT)/health; do \
		for i in $$(seq 120); do curl -sf $$url > /dev/null && break; sleep 1; done; \
		curl -sf $$url > /dev/null || { echo "not healthy: $$url (see $(UI_DIR)/*.log)"; exit 1; }; done
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   (export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api)"
	@echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)    (registry of $(LLMREC_HOME)/mlflow.db)"
	@echo "Serve the deployments (runs write to $(LLMREC_HOME)): make serve [LANDING=$(LANDING)]"
	@echo "Stop both: make ui-stop"

# The nightly and manual deployments against the `make ui` Prefect server, on LLMREC_HOME.
serve: install
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api LLMREC_HOME=$(LLMREC_HOME) \
		$(VENV)/bin/llmrec serve --landing $(LANDING) --home $(LLMREC_HOME)

# PostgreSQL's server programs, for the native production stack and its end-to-end test:
# installed from Debian's package when missing (needs root, as in CI).
postgres:
	@$(PYTHON) docker/stack.py pg-bindir > /dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
		else echo "PostgreSQL is missing: sudo apt-get install -y postgresql"; exit 1; fi; }

# The production topology natively (docker/stack.py): Postgres, S3 (moto), MLflow with
# basic-auth, Prefect with an auth string, on 127.0.0.1; data and pids in $(STACK_DIR).
stack: install postgres
	$(PY) docker/stack.py up --dir $(STACK_DIR)

stack-stop:
	$(PYTHON) docker/stack.py down --dir $(STACK_DIR)

ui-stop:
	@for name in prefect mlflow; do f=$(UI_DIR)/$$name.pid; \
		if [ -f $$f ]; then kill -TERM -$$(cat $$f) 2>/dev/null && echo "stopped $$name"; rm -f $$f; fi; done
