# edgeloop: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Debian/Ubuntu packages the test-suite needs (real broker, real InfluxDB 1.x and its CLI).
APT_PACKAGES := mosquitto mosquitto-clients influxdb influxdb-client chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: demo test test-fast chaos system-deps bench clean help

help:
	@echo "make demo   - create .venv, install, run a simulated fleet end to end (no servers needed)"
	@echo "make test   - install Mosquitto + InfluxDB if missing, install Python deps, run the whole suite"
	@echo "make bench  - run the benchmarks and rewrite BENCHMARKS.md"
	@echo "make chaos  - run the failure tests (broker/aggregator/agent kills, outages) CHAOS_ROUNDS times"

$(VENV)/.stamp-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$*]'
	touch $@

demo: $(VENV)/.stamp-aggregator
	$(VENV)/bin/edgeloop demo $(DEMO_ARGS)

# Installs what is missing from the system package manager (Debian/Ubuntu: apt-get).
# Elsewhere install Mosquitto >= 2.0 and InfluxDB 1.x (influxd + influx) yourself; see README.
system-deps:
	@missing=""; \
	for b in /usr/sbin/mosquitto /usr/bin/mosquitto_pub /usr/bin/influxd /usr/bin/influx /usr/bin/chromium /usr/bin/chromedriver; do \
	  [ -x $$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(APT_PACKAGES) (missing:$$missing)"; \
	  command -v apt-get >/dev/null || { echo "no apt-get: install Mosquitto and InfluxDB 1.x by hand (README)"; exit 1; }; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi
	@# The Debian packages enable system services; the tests start their own servers on free ports.

test: system-deps $(VENV)/.stamp-dev
	EDGELOOP_REQUIRE_SERVICES=1 $(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-fast: $(VENV)/.stamp-dev
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# The chaos tests also run in `make test`; this repeats them to shake out rare orderings.
CHAOS_ROUNDS ?= 3
chaos: system-deps $(VENV)/.stamp-dev
	for i in $$(seq $(CHAOS_ROUNDS)); do \
	  EDGELOOP_REQUIRE_SERVICES=1 $(PY) -m pytest -n 2 -q tests/test_delivery_chaos.py tests/test_agent_chaos.py || exit 1; \
	done

bench: system-deps $(VENV)/.stamp-dev
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
