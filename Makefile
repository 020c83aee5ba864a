# Two commands on a fresh machine with Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test install install-test migrate seed lint migration bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

migrate: install
	$(VENV)/bin/flask --app app db upgrade

seed: migrate
	$(VENV)/bin/flask --app app seed --demo

## make run: the console with demo data on http://127.0.0.1:$(PORT) (SQLite, no other service)
## It also serves a fake LLM upstream on 127.0.0.1:$(FAKE_UPSTREAM_PORT); the demo seed adds channels to it.
FAKE_UPSTREAM_PORT ?= 8099
run: migrate
	ALLOW_PRIVATE_UPSTREAMS=1 DEMO_UPSTREAM_URL=http://127.0.0.1:$(FAKE_UPSTREAM_PORT) $(VENV)/bin/flask --app app seed --demo
	@echo "Console: http://127.0.0.1:$(PORT)   relay: http://127.0.0.1:$(PORT)/v1 (fake upstream on :$(FAKE_UPSTREAM_PORT))"
	@$(PY) -m bench.fake_upstream --host 127.0.0.1 --port $(FAKE_UPSTREAM_PORT) --chunks 8 --delay-ms 40 >/dev/null & \
	FAKE=$$!; trap 'kill $$FAKE' EXIT INT TERM; \
	ALLOW_PRIVATE_UPSTREAMS=1 PORT=$(PORT) $(VENV)/bin/gunicorn -c python:console.gunicorn_conf app:app

## make test: the whole suite (PostgreSQL and browser tests run when configured)
test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-test
	$(VENV)/bin/ruff check console tests bench app.py

## make migration: regenerate the initial revision from the models (pre-release only)
migration: install
	$(PY) migrations/regenerate_initial.py

clean:
	rm -rf $(VENV) instance .pytest_cache
