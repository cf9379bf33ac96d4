# hybridmig: `make demo` migrates a process between two local network
# namespaces; `make test` runs the whole test suite. Both set up first.
# `make lint` and `make test-unit` need neither root nor CRIU: only the
# light set-up of scripts/venv.sh (a venv with the package and its native module).
VENV := .venv
PY := $(VENV)/bin/python
PY_SOURCES := src tests bench native
C_SOURCES = $(wildcard native/api/*.h native/src/*.[ch] native/hook/*.c)
# the tests that need no root, no CRIU and little time (markers: pyproject.toml)
UNIT := not root and not criu and not slow

.PHONY: setup venv test test-unit lint fmt soak demo bench bench-full zdtm-lazy clean

setup:
	@bash scripts/setup.sh

venv:
	@bash scripts/venv.sh test,lint,bench

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -q tests -m "$(UNIT)" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(C_SOURCES)
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff format $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(C_SOURCES)

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

# CRIU's own zdtm tests in its lazy-pages modes, the patched CRIU against the
# released one (scripts/zdtm-lazy.sh; not part of `make test`: 10-20 min)
zdtm-lazy: setup
	ZDTM_DIR=$(ZDTM_DIR) ZDTM_TESTS="$(ZDTM_TESTS)" bash scripts/zdtm-lazy.sh

clean:
	rm -rf $(VENV) build src/hybridmig/_native*.so src/hybridmig/_native.c
