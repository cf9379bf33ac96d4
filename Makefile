# hybridmig: `make demo` migrates a process between two local network
# namespaces; `make test` runs the whole test suite. Both set up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test soak demo bench bench-full clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# the randomized fault-injection soak (tests/soak.py): SOAK_N iterations,
# SOAK_SEED to replay a run, SOAK_ONLY=I for its iteration I alone
soak: setup
	SOAK_N=$(SOAK_N) SOAK_SEED=$(SOAK_SEED) SOAK_ONLY=$(SOAK_ONLY) $(PY) tests/soak.py

demo: setup
	$(VENV)/bin/hybridmig demo

bench: setup
	$(VENV)/bin/hybridmig bench --quick

bench-full: setup
	$(VENV)/bin/hybridmig bench

clean:
	rm -rf $(VENV) build src/hybridmig/_native*.so src/hybridmig/_native.c
