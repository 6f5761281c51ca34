# Two entry points on a fresh machine: `make demo` (the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test install clean

$(VENV)/.runtime: requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt requirements-tpu.txt
	$(PY) -m pip install -q -r requirements-test.txt -r requirements-tpu.txt
	touch $@

install: $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(PY) -m vt_jax.train --config=grpo_demo --workdir=$(WORKDIR)

test: $(VENV)/.test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
