# `make demo` and `make test` do all the set-up on a fresh machine.
# Uses the active virtual environment if there is one, otherwise creates .venv here.
TORCH_SPEC ?= torch==2.13.0
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
VENV_DEP :=
else
PY := $(CURDIR)/.venv/bin/python
VENV_DEP := .venv/bin/python
endif
PLUGINS := $(wildcard plugins/*/pyproject.toml)
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench clean

.venv/bin/python:
	python3 -m venv .venv

# torch goes first and pinned: anything unpinned would pull a multi-GB CUDA build.
install: $(VENV_DEP)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]" $(foreach p,$(PLUGINS),-e $(dir $(p)))

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick loop while developing: everything but the tests marked slow.
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/imports.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/masks.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/callbacks.py
	$(PY) benchmarks/sequential.py
	$(PY) benchmarks/small_tensors.py
	$(PY) benchmarks/sparsegpt.py
	$(PY) benchmarks/deploy.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/upkeep.py

clean:
	rm -rf .venv build *.egg-info lightning_logs out
