# Set-up and the two everyday jobs. Everything installs into .venv; nothing is fetched from a model hub.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: setup serve test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[serve,data,train,dev]'
	touch $@

serve: setup
	BENTOML_DO_NOT_TRACK=True $(VENV)/bin/bentoml serve service:DSDService --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/pipeline_step.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
