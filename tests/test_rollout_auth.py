"""Who may use a sidecar (rollout/secret.py, rollout/client/auth.py, rollout/sidecar/auth.py) without starting one:
the secret's sources, the ASGI middleware on a small Starlette app, and the weight-transfer rendezvous on loopback
(real TCPStore + gloo groups in threads), where a stranger without the secret cannot join and a member that cannot
prove it is refused before any weight moves.
The live sidecar's routes are checked in tests/test_rollout_sidecar.py and tests/test_rollout_collective.py."""
import os
import stat
import threading
from datetime import timedelta

import pytest
import torch
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from megatron_opsd.errors import UsageError
from megatron_opsd.parallel.distributed import free_port
from megatron_opsd.rollout.client import auth
from megatron_opsd.rollout.client.auth import bearer, find_secret
from megatron_opsd.rollout.secret import (SECRET_ENV, SECRET_FILE_ENV, member_tag, read_secret_file, rendezvous_key,
                                          store_prefix, verify_members, write_secret_file)
from megatron_opsd.rollout.sidecar.auth import RequireSecret, sidecar_secret

SECRET = "s3cret-" + "x" * 36


# ---------------------------------------------------------------------------------------------------- sources
def test_secret_sources_in_order(tmp_path):
    path = write_secret_file(tmp_path / "run.secret", "from-file")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert find_secret({}) is None
    assert find_secret({SECRET_FILE_ENV: str(path)}) == "from-file"
    assert find_secret({SECRET_ENV: "from-env", SECRET_FILE_ENV: str(path)}) == "from-env"
    assert find_secret({SECRET_ENV: "from-env", "MINE": "mine"}, env="MINE") == "mine"
    assert find_secret({SECRET_ENV: "from-env"}, file=str(path)) == "from-file"  # rollout.secret_file first
    with pytest.raises(UsageError, match=r"rollout.secret_env: \$MINE is not set"):
        find_secret({SECRET_ENV: "from-env"}, env="MINE")


def test_secret_file_must_be_private_and_is_never_followed_or_overwritten(tmp_path):
    path = write_secret_file(tmp_path / "a.secret", "abc")
    path.chmod(0o644)
    with pytest.raises(UsageError, match=r"OPSD_SIDECAR_SECRET_FILE: .* is readable by others .*chmod 600"):
        read_secret_file(path)
    with pytest.raises(UsageError, match="cannot read the secret file"):
        read_secret_file(tmp_path / "missing")
    (tmp_path / "target").write_text("theirs")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for existing in (path, tmp_path / "link"):  # a planted file or link is refused, not written through
        with pytest.raises(FileExistsError):
            write_secret_file(existing, "mine")
    assert (tmp_path / "target").read_text() == "theirs"


def test_run_secret_is_created_once_and_exported(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)
    first = auth.run_secret()
    assert len(first) >= 40 and os.environ[SECRET_ENV] == first and auth.run_secret() == first


def test_the_sidecar_takes_its_secret_out_of_its_environment(monkeypatch, tmp_path):
    """vLLM's engine and worker processes, started after this, must not inherit it."""
    monkeypatch.setenv(SECRET_ENV, "given")
    assert sidecar_secret(None, 8000) == ("given", None) and SECRET_ENV not in os.environ
    made = tmp_path / "made.secret"  # --secret-file that does not exist yet: created, private
    secret, temporary = sidecar_secret(str(made), 8000)
    assert temporary is None and read_secret_file(made) == secret and len(secret) >= 40
    monkeypatch.setenv(SECRET_FILE_ENV, str(made))
    assert sidecar_secret(None, 8000) == (secret, None) and SECRET_FILE_ENV not in os.environ
    secret, temporary = sidecar_secret(None, 8000)  # nothing given: a new private file, removed by the caller
    assert read_secret_file(temporary) == secret and "opsd-sidecar-8000-" in temporary.name
    temporary.unlink()


# ---------------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def app_calls():
    calls = []

    async def handler(request):
        calls.append((request.method, request.url.path))
        return PlainTextResponse("ran")

    async def socket(websocket):
        calls.append(("WS", "/ws"))
        await websocket.accept()
        await websocket.close()

    app = Starlette(routes=[Route("/health", handler, methods=["GET"]), Route("/generate", handler, methods=["POST"]),
                            Route("/v1/models", handler), WebSocketRoute("/ws", socket)])
    app.add_middleware(RequireSecret, secret=SECRET)
    return TestClient(app), calls


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRET}"},
                                     {"Authorization": SECRET}, {"Authorization": f"Bearer {SECRET}x"},
                                     {"Authorization": f"Bearer {SECRET[:-1]}"}, {"X-Api-Key": SECRET}])
def test_requests_without_the_secret_get_401_and_reach_no_route(app_calls, headers):
    client, calls = app_calls
    calls.clear()
    for method, path in [("POST", "/generate"), ("GET", "/v1/models"), ("POST", "/health"), ("GET", "/nowhere")]:
        resp = client.request(method, path, headers=headers)
        assert resp.status_code == 401 and "missing or wrong sidecar secret" in resp.json()["detail"]
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert SECRET not in resp.text
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/ws", headers=headers):
            pass
    assert calls == []  # no handler ran


def test_the_secret_opens_every_route_and_health_is_open(app_calls):
    client, calls = app_calls
    calls.clear()
    assert client.get("/health").text == "ran"
    for headers in (bearer(SECRET), {"Authorization": f"bearer {SECRET}"}):
        assert client.post("/generate", headers=headers).text == "ran"
        assert client.get("/v1/models", headers=headers).text == "ran"
    with client.websocket_connect("/ws", headers=bearer(SECRET)):
        pass
    assert calls == [("GET", "/health")] + [("POST", "/generate"), ("GET", "/v1/models")] * 2 + [("WS", "/ws")]
    assert bearer(None) == {} and bearer("") == {}


# ---------------------------------------------------------------------------------------------------- rendezvous
def _in_threads(*jobs):
    """Run each job in its own thread; (result or exception) per job."""
    out = [None] * len(jobs)

    def run(i, job):
        try:
            out[i] = job()
        except Exception as err:  # noqa: BLE001 - returned for the assertions
            out[i] = err

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return out


def test_a_stranger_without_the_secret_cannot_join_the_transfer_group():
    """The trainer opens the group with the run's key; a stranger who reaches the store's port but cannot derive the
    key (here: another secret) finds none of the group's keys, so neither side forms a group; the sidecar's worker
    with the right key joins the same way, and a tensor broadcast reaches it."""
    transfer = pytest.importorskip("megatron_opsd.rollout.transfer")
    nonce = "n0"
    key = rendezvous_key(SECRET, nonce)

    def side(rank, k, port, timeout_s):
        return lambda: transfer.open_group("gloo", "127.0.0.1", port, rank, 2, timeout_s, k)

    port = free_port()
    trainer, stranger = _in_threads(side(0, key, port, 3.0), side(1, rendezvous_key("guess", nonce), port, 3.0))
    assert isinstance(trainer, Exception) and isinstance(stranger, Exception), (trainer, stranger)
    assert "timeout" in str(trainer) and "timeout" in str(stranger)  # waited for keys the other never wrote

    port = free_port()
    trainer, worker = _in_threads(side(0, key, port, 30.0), side(1, rendezvous_key(SECRET, nonce), port, 30.0))
    assert not isinstance(trainer, Exception) and not isinstance(worker, Exception), (trainer, worker)
    payload, received = torch.arange(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    timeout = timedelta(seconds=30)
    _in_threads(lambda: trainer[1].broadcast(payload, 0, timeout).wait(timeout),
                lambda: worker[1].broadcast(received, 0, timeout).wait(timeout))
    assert torch.equal(received, payload)
    assert store_prefix(key) != store_prefix(rendezvous_key(SECRET, "n1")) and key not in store_prefix(key)


def test_a_member_that_cannot_prove_the_key_is_refused_on_both_sides():
    """Someone who got into the group without the key (knowing the store prefix, or by taking a member's place on one
    of gloo's sockets) presents a wrong tag: the trainer and the member both refuse, before any weight moves."""
    key, port = rendezvous_key(SECRET, "n2"), free_port()
    dist = torch.distributed

    def member(rank, proof_key):
        def run():
            store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=30),
                                  wait_for_workers=False)
            group = dist.ProcessGroupGloo(dist.PrefixStore(store_prefix(key), store), rank, 2, timedelta(seconds=30))
            verify_members(group, proof_key, rank, 2, 30.0)
        return run

    trainer, impostor = _in_threads(member(0, key), member(1, "not the key"))
    assert isinstance(trainer, PermissionError) and "rank(s) [1] did not prove the run's secret" in str(trainer)
    assert isinstance(impostor, PermissionError) and "rank(s) [0]" in str(impostor)
    assert member_tag(key, 1) != member_tag(key, 2) != member_tag("other", 1)
