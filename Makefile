# One-command setup: `make test` on a fresh machine creates .venv, installs the pinned set,
# builds the demo models and runs the tests. See README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR):$(CURDIR)/include:$(CURDIR)/plugins
export ORT_DISABLE_TELEMETRY := 1

.PHONY: venv models prometheus nginx chromium test deploy-check lint serve up down demo tour bench clean cluster-up cluster-down cluster-demo

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

venv: $(STAMP)

models: $(STAMP)
	$(BIN)/python scripts/build_models.py --out models

# Debian's Prometheus, for the metrics integration tests (CI runs as root).
prometheus:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else echo "prometheus is missing: sudo apt-get install --no-install-recommends prometheus" >&2; exit 1; fi; }

# Debian's nginx: the one-machine cluster's data plane (Envoy's stand-in, configured from the VirtualServices).
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light; \
	  else echo "nginx is missing: sudo apt-get install --no-install-recommends nginx-light" >&2; exit 1; fi; }

# Debian's Chromium, for the UI screenshot test (driven by Playwright; no browser download).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "chromium is missing: sudo apt-get install --no-install-recommends chromium" >&2; exit 1; fi; }

# npm's @kubernetes-models/prometheus-operator: the PodMonitor's schema (devstack/manifests.py).
NODE_STAMP := devstack/node/node_modules/.installed
$(NODE_STAMP): devstack/node/package.json devstack/node/package-lock.json
	cd devstack/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Two workers, a test file each at a time (its module's servers stay one process's): CI has 2 cores.
TEST_WORKERS ?= 2
test: models prometheus nginx chromium $(NODE_STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# deploy/'s overlays (or yours: make deploy-check OVERLAYS=path/to/overlay) rendered and validated.
OVERLAYS ?= local-cluster production
deploy-check: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m devstack.manifests $(OVERLAYS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The ports of make serve, up and demo on 127.0.0.1 (up and demo refuse one another process has, naming it).
SERVER_PORT ?= 8000
PROMETHEUS_PORT ?= 9090
AIRFLOW_PORT ?= 8080
STACK_PORTS = --port $(SERVER_PORT) --prometheus-port $(PROMETHEUS_PORT) --airflow-port $(AIRFLOW_PORT)

serve: models
	$(BIN)/model-server --repository models --host 127.0.0.1 --port $(SERVER_PORT)

up: models prometheus
	$(BIN)/python scripts/stack.py up $(STACK_PORTS)

down:
	@test -x $(BIN)/python && $(BIN)/python scripts/stack.py down || true

demo: models prometheus
	$(BIN)/python scripts/demo.py --repository models $(STACK_PORTS)

# Kubernetes mode on one machine: API server, pod runner, nginx data plane, Prometheus (15 s), S3.
CLUSTER_AIRFLOW_PORT ?= 8081

cluster-up: models prometheus nginx
	$(BIN)/python scripts/cluster.py up --airflow-port $(CLUSTER_AIRFLOW_PORT)

cluster-down:
	@test -x $(BIN)/python && $(BIN)/python scripts/cluster.py down || true

cluster-demo: models prometheus nginx
	$(BIN)/python scripts/cluster.py demo --airflow-port $(CLUSTER_AIRFLOW_PORT)

tour: models
	$(BIN)/python scripts/tour.py --repository models

bench: models prometheus
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/routing.py
	$(BIN)/python bench/gates.py
	$(BIN)/python bench/rollout.py

clean:
	rm -rf models .pytest_cache .mypy_cache .ruff_cache
