# `make run` sets everything up and runs the broker; `make test` sets everything up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test browser postgres lint typecheck format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,postgresql]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/jobbroker serve

test: $(VENV)/.installed browser postgres
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) tests/typecheck.py
	$(PY) -m pytest

# The dashboard's browser test drives Debian's chromium through chromedriver: installed here when
# root (as in CI), else that one test skips and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || [ "$$(id -u)" != 0 ] || \
		(echo "make test: installing Debian's chromium and chromium-driver with apt-get (for the dashboard's browser test)" && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

# The store tests run on PostgreSQL too, a server of the suite's own started from Debian's
# binaries: installed here when root (as in CI), else those tests skip and say why.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		(echo "make test: installing Debian's postgresql with apt-get (for the PostgreSQL store tests)" && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(VENV)/.installed
	$(PY) tests/typecheck.py

format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The beanstalkd baseline needs Debian's beanstalkd; installed here when root, else skipped and said so.
bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,postgresql,bench]'
	command -v beanstalkd >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq beanstalkd) || true
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
