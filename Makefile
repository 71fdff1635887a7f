# The two commands a newcomer needs: `make demo` (tiny OPSD run on CPU) and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=
# Two pytest workers, whole files each (module fixtures such as a shared sidecar stay in one process): the suite
# is mostly process start-ups and waits, so two workers fill the CI machine's two cores (tests/conftest.py starts
# the longest files first; --no-loadscope-reorder keeps that order instead of most-tests-first).
PYTEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: setup demo test test-fast
setup:
	OPSD_VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/megatron-opsd demo

# The whole suite, run in a copy of this working tree at a fresh temporary path (the checkout's location and what
# lies beside it must not matter: scripts/test_from_copy.sh).
test: setup
	bash scripts/setup_test_slurm.sh
	bash scripts/test_from_copy.sh $(VENV)/bin/python $(PYTEST_WORKERS) $(PYTEST_ARGS)

# Skips the tests marked slow (they still run in CI through `make test`), and the vllm ones when `import vllm`
# fails (saying so at the end); `make test` fails instead (tests/conftest.py).
test-fast: setup
	OPSD_ALLOW_MISSING_VLLM=1 HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_WORKERS) $(PYTEST_ARGS)
