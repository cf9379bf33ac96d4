# hybridmig: `make demo` migrates a process between two local network
# namespaces; `make test` runs the whole test suite. Both set up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench bench-full clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/hybridmig demo

bench: setup
	$(VENV)/bin/hybridmig bench --quick

bench-full: setup
	$(VENV)/bin/hybridmig bench

clean:
	rm -rf $(VENV) build src/hybridmig/_native*.so src/hybridmig/_native.c
