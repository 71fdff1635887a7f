# The two commands a newcomer needs: `make demo` (tiny OPSD run on CPU) and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast
setup:
	OPSD_VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/megatron-opsd demo

test: setup
	bash scripts/setup_test_slurm.sh
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Skips the tests marked slow (they still run in CI through `make test`).
test-fast: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)
