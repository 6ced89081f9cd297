# `make test` and `make demo` bootstrap .venv themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weightlab-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test demo venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -P -m pytest -n 2 -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -P -m weightlab.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
