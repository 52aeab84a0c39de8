# The two commands of the README: `make repro` runs the whole pipeline, `make test` the tests.
# Both create .venv on first use and install the pinned versions from constraints.txt.
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# No usage reports from Prefect, MLflow or DVC: runs must not reach the network.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test test-slow check clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

repro: install
	python -m flows.pipeline

check: install
	python -m stages.check

test: install
	python -m pytest -q

test-slow: install
	python -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
