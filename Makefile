# driftloop — the two commands a newcomer runs are `make demo` and `make test`.
# Everything else is a building block of those two.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen
PYTEST_ARGS ?=
# Install with bytecode compiled: this environment may set PYTHONDONTWRITEBYTECODE, and then
# every process (each Airflow task, each service, each test subprocess) would compile pandas,
# mlflow and airflow from source again on import.
export UV_COMPILE_BYTECODE := 1

# helm for the chart's checks, built once from the Go module proxy into .tools/ (a new version
# gets a folder of its own, so changing HELM_VERSION reinstalls). Tests find it through HELM.
HELM_VERSION ?= v4.3.2
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
export HELM := $(CURDIR)/.tools/helm-$(HELM_VERSION)/helm
CHART := deploy/helm/driftloop
CHART_CI_VALUES := $(CHART)/ci/three-replicas-values.yaml

.PHONY: help bootstrap tools env up down status demo test test-unit test-integration lint chart format schemas bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'

bootstrap: ## install uv when missing and the locked Python environment
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv>=0.5"
	$(UV) sync --frozen
	$(RUN) python -m compileall -q -j 0 driftloop driftloop_tools gateway consumers schemas dags

tools: $(HELM) ## helm (go install from the Go module proxy; once per HELM_VERSION)

$(HELM):
	GOBIN=$(dir $(HELM)) $(GO) install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)

env: ## create .env from .env.example when it does not exist
	@test -f .env || { cp .env.example .env; echo "created .env from .env.example (development secrets)"; }

up: bootstrap env ## install what is missing and start the native stack (idempotent)
	$(RUN) driftloop stack up

down: ## stop everything the native stack started
	@if [ -x .venv/bin/driftloop ]; then $(RUN) driftloop stack down; else echo "stack is not installed"; fi

status: ## processes and readiness of the native stack
	$(RUN) driftloop stack status

# The closed loop: April-December replayed at 30 simulated hours a second (about 4 minutes),
# so drift in spring retrains and promotes a model while the replay still runs. `driftloop demo
# replay` replays without watching the loop.
DEMO_HOURS_PER_SECOND ?= 30

demo: up ## the main job: stack up, first champion, 2011 replayed, drift -> retrain -> promotion -> swap
	$(RUN) driftloop demo run --hours-per-second $(DEMO_HOURS_PER_SECOND)

test: bootstrap tools env ## unit + integration tests against a stack started from scratch, then stopped
	@started_here=0; \
	if ! $(RUN) driftloop stack status >/dev/null 2>&1; then started_here=1; fi; \
	$(RUN) driftloop stack up; \
	status=0; $(RUN) pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$started_here = 1 ]; then $(RUN) driftloop stack down; fi; \
	exit $$status

test-unit: bootstrap tools ## unit tests only (nothing running)
	$(RUN) pytest -m unit $(PYTEST_ARGS)

test-integration: up ## integration tests against the running stack
	$(RUN) pytest -m integration $(PYTEST_ARGS)

lint: bootstrap chart ## ruff, formatting, mypy strict, the import layers and the Helm chart
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy
	$(RUN) lint-imports

chart: bootstrap tools ## helm lint; helm template (3 replicas of everything) through kubernetes-validate
	$(HELM) lint --strict $(CHART) -f $(CHART_CI_VALUES)
	$(HELM) template driftloop $(CHART) -f $(CHART_CI_VALUES) > .tools/driftloop-3-replicas.yaml
	$(RUN) kubernetes-validate --strict --quiet .tools/driftloop-3-replicas.yaml

format: bootstrap ## apply ruff's fixes and formatting
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

schemas: bootstrap ## regenerate the committed JSON Schema files from the event models
	$(RUN) python -m schemas.generate
