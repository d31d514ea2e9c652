# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it (editable, with the test extra) when
# pyproject.toml is newer than the last install, so running them again is cheap.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench mutations clean

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Two distributions: the client (client/, standard library only) and the agent, which needs it.
	# Out with both first: an older iapd that shipped bin/iapctl would take it away on upgrade.
	$(BIN)/pip uninstall -q -y iapd iapctl 2>/dev/null || true
	$(BIN)/pip install -q -e ./client -e '.[test]'
	touch $(STAMP)

# The independent OpenID Provider the tests also run against (node-oidc-provider, from npm);
# without node and npm those tests are skipped, and say so.
OP_STAMP := tests/oidc_provider/node_modules/.package-lock.json

$(OP_STAMP): tests/oidc_provider/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd tests/oidc_provider && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the tests against an independent OpenID Provider will be skipped"; fi

# A real Secret Service for the keyring store's tests (gnome-keyring on a private D-Bus session):
# installed from Debian's packages when missing and root may; else those tests are skipped.
KEYRING_STAMP := $(VENV)/.keyring

$(KEYRING_STAMP):
	@if command -v gnome-keyring-daemon >/dev/null 2>&1 && command -v dbus-daemon >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gnome-keyring dbus-daemon >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		     --no-install-recommends gnome-keyring dbus-daemon >/dev/null; } \
		|| echo "could not install gnome-keyring: the keyring store's Secret Service tests will be skipped"; \
	else echo "gnome-keyring-daemon not found (apt-get install gnome-keyring dbus-daemon): the keyring store's Secret Service tests will be skipped"; fi
	@touch $(KEYRING_STAMP)

test: $(STAMP) $(OP_STAMP) $(KEYRING_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Every README promise's test, proven able to fail: each guarding line mutated in turn, its test
# run, the file put back (tests/mutations.py; ~20 minutes on 2 cores). Not part of `make test`.
mutations: $(STAMP) $(OP_STAMP) $(KEYRING_STAMP)
	$(BIN)/python tests/mutations.py

# Benchmarks print ratios measured side by side in one run; thresholds live here, not in tests.
bench: $(STAMP)
	$(BIN)/python bench/client_latency.py
	$(BIN)/python bench/daemon_load.py
	$(BIN)/python bench/daemon_resources.py
	$(BIN)/python bench/renewal_soak.py
	$(BIN)/python bench/signed_jwt.py
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/day_soak.py

clean:
	rm -rf $(VENV) build client/build *.egg-info daemon/*.egg-info client/*.egg-info
