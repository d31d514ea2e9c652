# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it (editable, with the test extra) when
# pyproject.toml is newer than the last install, so running them again is cheap.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Benchmarks print ratios measured side by side in one run; thresholds live here, not in tests.
bench: $(STAMP)
	$(BIN)/python bench/client_latency.py
	$(BIN)/python bench/daemon_load.py
	$(BIN)/python bench/daemon_resources.py
	$(BIN)/python bench/renewal_soak.py

clean:
	rm -rf $(VENV) build *.egg-info daemon/*.egg-info
