# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it on first use (uv, ~1-2 min).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed pinned and first: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)

.PHONY: demo test clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	$(VENV)/bin/uv pip install --python $(PY) -q "$(TORCH)"
	$(VENV)/bin/uv pip install --python $(PY) -q -e ".[dev]" "$(TORCH)"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m flows.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
