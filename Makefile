# Two commands do all the set-up on a fresh machine with Python >= 3.11:
#   make demo   installs ddk_jax (with lm-eval) into .venv and runs the embedded demo (configs/demo.py)
#   make test   installs ddk_jax + test extras into .venv and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/python -m pip

.PHONY: demo test install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PIP) install -e '.[eval]'  # the demo also reports downstream accuracy (lm-eval)

install-test: $(VENV)/bin/python
	$(PIP) install -e '.[test]'

demo: install
	$(VENV)/bin/python -m ddk_jax.main --config=configs/demo.py --workdir=runs/demo

test: install-test
	$(VENV)/bin/python -m ruff check ddk_jax tests benchmarks configs
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
