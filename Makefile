# Two commands on a fresh machine: `make run` and `make test`. Both bootstrap what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 7071

.PHONY: test run lint typecheck unit pytest bench infra-check browser-deps deps clean messages portal-assets

deps: $(STAMP) node_modules/.package-lock.json

# The app's venv, rebuilt when a requirements file changes.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# Azurite and other Node dev tools, exactly as package-lock.json pins them.
node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund

# Headless Chromium for the browser tests (Debian packages; needs root, as on CI).
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing chromium and chromium-driver from Debian packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check connector_core functions function_app.py

typecheck: deps
	$(VENV)/bin/mypy

pytest: deps browser-deps
	$(VENV)/bin/pytest

infra-check:
	bash infra/check.sh infra

test: lint typecheck pytest infra-check

run: deps
	$(PY) -m devtools.run --port $(PORT) $(if $(filter-out 0,$(SEED_REPORTS)),--seed-reports)

bench: deps
	$(PY) -m devtools.bench

# Portal message catalogs: extract every msgid, merge it into each language's .po (then translate;
# tests/portal/test_translations.py fails while one is missing).
PORTAL := connector_core/service/portal_web
messages: deps
	$(VENV)/bin/pybabel extract -F $(PORTAL)/babel.cfg --no-location --sort-output \
		--project ehr-virtual-visit-connector -o $(PORTAL)/locales/messages.pot .
	$(VENV)/bin/pybabel update -i $(PORTAL)/locales/messages.pot -d $(PORTAL)/locales \
		--no-fuzzy-matching --ignore-obsolete -w 100

# The portal's Fluent 2 tokens stylesheet, from @fluentui/tokens in node_modules.
portal-assets: deps
	$(PY) -m devtools.portal_assets

clean:
	rm -rf $(VENV) .venv-infra node_modules .mypy_cache .ruff_cache .pytest_cache
