"""Trainer operations: resume equals an uninterrupted run (also with overlapped rollouts after kill -9); overlapped
rollouts on two real sidecar replicas; the `correct` filter trains on nothing when no rollout is correct; bad
config keys are errors naming the key."""
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_opsd.config import ConfigError, load_config
from megatron_opsd.evaluation.runner import OneSidecarEvaluator
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.rollout.client import SidecarClient, start_sidecar_process
from megatron_opsd.rollout.client.auth import run_secret
from megatron_opsd.training.opsd.cli import run_trainer
from megatron_opsd.training.run import local_sidecar_options
from megatron_opsd.training.opsd.step import OPSD_PHASES
from tests._rewards import KILL_AT_CALL_ENV
from tests._run_configs import assert_phases_add_up
from tests._workers_grpo import hf_logprobs
from tests.test_rollout_sidecar import hf_greedy, served_generates
from tests.test_trainer_e2e import tiny_run_config

pytestmark = pytest.mark.vllm

STEP_KEYS = ("loss", "divergence", "rollout/mean_length", "grad_norm")  # what a step trains on and computes
REPLICA_PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [100, 12]]
REPLICA_MAX_TOKENS = 8


def run(config_path, *overrides, env=None, sidecar=None):
    """The trainer on one rank; on ``sidecar`` (lent serving ``model.path`` at version 0) if given."""
    cfg = load_config(str(config_path), list(overrides))
    if sidecar is not None:
        cfg.rollout.sidecar_urls = [sidecar.lend(cfg.model.path)]
    run_distributed(run_trainer, 1, cfg.parallel, cfg, env=env)
    with open(f"{cfg.logging.dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sidecar(tiny_checkpoints, tmp_path_factory):
    """One sidecar for the module's one-replica runs, with the flags each run would give its own
    (``local_sidecar_options``), lent to each serving the run's start model (a restore push to version 0, as a
    local pipeline lends its stages one): six vLLM starts become one. A resumed run then finds the sidecar its
    cut run used, still serving that run's later weights, and restores its checkpoint's (docs/sidecar.md)."""
    tmp = tmp_path_factory.mktemp("shared_sidecar")
    cfg = load_config(str(tiny_run_config(tmp, tiny_checkpoints["qwen3"])))
    with OneSidecarEvaluator(log_path=tmp / "sidecar.log", **local_sidecar_options(cfg)) as shared:
        yield shared


@pytest.fixture(scope="module")
def synchronous_run(tiny_checkpoints, sidecar, tmp_path_factory):
    """A synchronous (max_staleness 0) three-step run: (its config, its metrics)."""
    tmp = tmp_path_factory.mktemp("synchronous")
    config = tiny_run_config(tmp, tiny_checkpoints["qwen3"], parallel={"tensor_model_parallel_size": 1},
                             train={"steps": 3}, checkpoint={"save_every": 1})
    return config, run(config, f"logging.dir={tmp / 'full'}", sidecar=sidecar)


def start_replicas(stack: ExitStack, cfg, folder) -> list:
    """Two sidecars on ``cfg``'s model started at once, as the trainer starts its local one (same dtype and
    model length) with the run's secret (made once here: two threads would each make one), each stopped when
    ``stack`` closes (also when the other failed to start)."""
    secret = run_secret()

    def start(i: int):
        return start_sidecar_process(cfg.model.path, dtype=cfg.rollout.local_sidecar_dtype,
                                     max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_tokens,
                                     log_path=folder / f"sidecar{i}.log", secret=secret)

    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(start, i) for i in range(2)]
        for started in starts:
            stack.callback(lambda started=started: started.exception() is None and started.result().stop())
    return [started.result() for started in starts]


@pytest.fixture(scope="module")
def two_replica_run(tiny_checkpoints, tmp_path_factory):
    """The uninterrupted run of the kill -9 test (rollout.max_staleness=1) on two real sidecar replicas
    (``rollout.sidecar_urls=[a, b]``, collective pushes: one gather broadcast to both), exported to HF: its config, metrics, and per replica afterwards the weight
    version, the /generate requests served and greedy samples of ``REPLICA_PROMPTS`` (the replicas stop here)."""
    tmp = tmp_path_factory.mktemp("two_replicas")
    config = tiny_run_config(tmp, tiny_checkpoints["qwen3"], parallel={"tensor_model_parallel_size": 1},
                             train={"steps": 3, "eval_every": 0}, checkpoint={"save_every": 1},
                             rollout={"max_staleness": 1},
                             reward={"kind": "callable", "callable": "tests._rewards:kill_at_call"})
    with ExitStack() as stack:
        urls = [replica.url for replica in start_replicas(stack, load_config(str(config)), tmp)]
        metrics = run(config, f"logging.dir={tmp / 'full'}", "rollout.sidecar_urls=" + ",".join(urls),
                      "rollout.transport=collective", f"export.hf_dir={tmp / 'hf'}")
        with SidecarClient(urls) as both:
            versions, served = both.weight_versions(), [served_generates(both, i) for i in range(2)]
        greedy = []
        for url in urls:
            with SidecarClient(url) as one:
                greedy.append([samples[0] for samples in one.generate(
                    REPLICA_PROMPTS, temperature=0.0, max_tokens=REPLICA_MAX_TOKENS, ignore_eos=True)])
    return dict(config=config, metrics=metrics, versions=versions, served=served, greedy=greedy, hf_dir=tmp / "hf")


@pytest.mark.slow
def test_resume_equals_uninterrupted(synchronous_run, sidecar, tmp_path):
    """A run cut after step 1 and resumed (checkpoint, sampler position, resumed weights restored on the sidecar)
    logs exactly the losses, divergences, rollout lengths and grad norms of an uninterrupted run."""
    config, full = synchronous_run
    run(config, f"logging.dir={tmp_path / 'cut'}", "train.steps=1", sidecar=sidecar)
    resumed = run(config, f"logging.dir={tmp_path / 'cut'}", "checkpoint.resume=true", sidecar=sidecar)
    assert [m["step"] for m in resumed] == [1, 2, 3]  # metrics.jsonl is appended to across the restart
    for key in STEP_KEYS:
        assert [m[key] for m in resumed[1:]] == [m[key] for m in full[1:]], key


@pytest.mark.slow
def test_overlapped_rollouts_on_two_sidecar_replicas(two_replica_run, synchronous_run, tiny_checkpoints):
    """Issue 26's "several sidecar replicas" on real sidecars, which the test double of tests/test_rollout_overlap.py
    cannot show: with max_staleness=1, two replicas and collective pushes, each step's batch is split between them
    (each served one request per step), every sample is within the bound (the trainer checks each one; batch k is from version
    max(0, k - 1) on both), both replicas received every push (version 3 after 3 steps) and serve the trainer's
    final weights (greedy equal to transformers on the exported model, their log-probs within 1e-3, which the
    initial weights miss by far more), and step 1 (version 0's batch in both modes) equals the synchronous run's.
    Steps 2 and 3 equal a one-replica run's: the kill -9 test below compares it with this one."""
    metrics, model_dir = two_replica_run["metrics"], str(two_replica_run["hf_dir"])
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 1.0, 1.0]
    assert two_replica_run["versions"] == [3, 3]
    assert two_replica_run["served"] == [3.0, 3.0]  # prompts_per_step=2: one prompt to each replica per step
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    expected = [hf_greedy(model, prompt, REPLICA_MAX_TOKENS) for prompt in REPLICA_PROMPTS]
    responses = [[response] for response in expected]
    trained = hf_logprobs(model_dir, REPLICA_PROMPTS, responses)
    initial = hf_logprobs(tiny_checkpoints["qwen3"], REPLICA_PROMPTS, responses)
    assert max_gap(trained, initial) > 1e-2  # three steps moved them 10x past the tolerance: the check can fail
    for samples in two_replica_run["greedy"]:
        assert [s.token_ids for s in samples] == expected
        assert all(s.weight_version == 3 for s in samples)
        worst = max_gap([[s.logprobs] for s in samples], trained)
        assert worst < 1e-3, worst
    first_synchronous = synchronous_run[1][0]
    assert all(metrics[0][key] == first_synchronous[key] for key in STEP_KEYS), (metrics[0], first_synchronous)


def max_gap(a: list, b: list) -> float:
    """The largest difference between two nested lists of log-probs (per prompt, per sample, per token)."""
    return max(abs(x - y) for ga, gb in zip(a, b) for ra, rb in zip(ga, gb) for x, y in zip(ra, rb))


@pytest.mark.slow
def test_overlapped_rollouts_resume_after_kill_9(two_replica_run, sidecar, tmp_path):
    """rollout.max_staleness=1 on the real sidecar (what the cheap tests/test_rollout_overlap.py cannot show: the
    background thread's HTTP requests, pushes between them, the phase timers of a real step), and a trainer
    SIGKILLed while grading step 2's rollouts, resumed from the step-1 checkpoint, equals the uninterrupted run:
    that checkpoint holds batch 2, generated by version 0, which the resumed run no longer could. The
    uninterrupted run is the two-replica one, the cut and resumed runs are on the module's one sidecar (the
    resumed run restores its checkpoint's weights on it, whatever the killed run left in flight): all three steps
    equal (step 1 is the cut run's), so the replicas' split batches are exactly one replica's."""
    config, full = two_replica_run["config"], two_replica_run["metrics"]
    assert [m["rollout/staleness"] for m in full] == [0.0, 1.0, 1.0]  # batch k from version max(0, k - 1)
    for m in full:
        assert_phases_add_up(m, (*OPSD_PHASES, "time/rollout_wait"))
        assert m["overlap/generate_s"] > 0 and m["overlap/sidecar_idle_s"] >= 0
    calls_per_step = 2 * 2  # prompts_per_step x n, one reward call each
    with pytest.raises(Exception):  # noqa: B017 - the launcher reports the killed rank in its own way
        run(config, f"logging.dir={tmp_path / 'cut'}", env={KILL_AT_CALL_ENV: str(calls_per_step + 1)},
            sidecar=sidecar)
    resumed = run(config, f"logging.dir={tmp_path / 'cut'}", "checkpoint.resume=true", sidecar=sidecar)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in (*STEP_KEYS, "rollout/staleness"):
        assert [m[key] for m in resumed] == [m[key] for m in full], key


def test_correct_filter_with_no_correct_rollout_trains_nothing(tiny_checkpoints, sidecar, tmp_path):
    """With rollout.filter=correct and a reward that is never correct, a real trainer step distils on nothing:
    loss 0, no gradient norm, no tokens; the filter's unit tests do not run the step around it."""
    config = tiny_run_config(tmp_path, tiny_checkpoints["qwen3"], parallel={"tensor_model_parallel_size": 1},
                             train={"steps": 1}, rollout={"filter": "correct"},
                             reward={"kind": "callable", "callable": "tests._rewards:never_correct"})
    (metrics,) = run(config, sidecar=sidecar)
    assert metrics["rollout/accuracy"] == 0.0 and metrics["rollout/fraction_filtered"] == 1.0
    assert metrics["loss"] == 0.0 and "grad_norm" not in metrics and "tokens" not in metrics


def test_bad_config_key_names_it(tmp_path):
    """Config only, no sidecar despite the module's vllm mark: a misspelt key or an unknown filter value is a
    ConfigError naming the key."""
    with pytest.raises(ConfigError, match="loss.kindd"):
        load_config(None, ["loss.kindd=jsd"])
    with pytest.raises(ConfigError, match="rollout.filter"):
        load_config(None, ["rollout.filter=best"])
