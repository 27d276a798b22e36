# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it on first use (uv, ~1-2 min).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed pinned and first: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# uv does not read pip's configuration: hand it the same local wheel folder (torch's CPU wheel).
ifneq ($(PIP_FIND_LINKS),)
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
endif

.PHONY: demo test clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	$(VENV)/bin/uv pip install --python $(PY) -q "$(TORCH)"
	$(VENV)/bin/uv pip install --python $(PY) -q -e ".[orchestration,dev]" "$(TORCH)"
	touch $@

# The main job runs on embedded defaults: artifacts under ./lmforge-home, and the Prefect server
# `scripts/server.sh prefect start` runs (state in lmforge-home/servers/prefect), else Prefect's own
# temporary server with its database under lmforge-home too (tasks/prefect_api.py).
export LMFORGE_HOME ?= $(CURDIR)/lmforge-home
export PREFECT_HOME ?= $(LMFORGE_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

demo: $(VENV)/.installed
	mkdir -p "$(PREFECT_HOME)"
	$(PY) -m flows.lifecycle

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

clean-venv:
	rm -rf $(VENV)
