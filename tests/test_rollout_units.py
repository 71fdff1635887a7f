"""Sidecar pieces that need no engine: weight staging (all or nothing), bucketing, on-policy checks, client errors."""
import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from megatron_opsd.parallel.launch import free_port
from megatron_opsd.rollout.client.buckets import iter_buckets
from megatron_opsd.rollout.client import (Sample, SidecarClient, SidecarError, StaleRolloutError, check_on_policy)
from megatron_opsd.rollout.protocol import STAGING_DIR_PREFIX
from megatron_opsd.rollout.sidecar.staging import WeightStager, WeightUpdateError, staging_root

SPECS = {"a.weight": ((4, 3), "F32"), "b.weight": ((5,), "F32"), "c.weight": ((2, 2), "F32")}


def _tensors():
    torch.manual_seed(0)
    return {k: torch.randn(shape) for k, (shape, _) in SPECS.items()}


def test_stager_commits_only_complete_updates():
    stager, t = WeightStager(SPECS, torch.float32), _tensors()
    uid = stager.begin(version=1, current_version=0)
    stager.add_bucket(uid, 0, {"a.weight": t["a.weight"]})
    with pytest.raises(WeightUpdateError, match=r"2 tensors not received.*nothing was applied") as err:
        stager.take_for_commit(uid)
    assert err.value.status == 409
    stager.add_bucket(uid, 1, {"b.weight": t["b.weight"], "c.weight": t["c.weight"]})
    stager.add_bucket(uid, 1, {"b.weight": t["b.weight"], "c.weight": t["c.weight"]})  # a retried bucket replaces
    update = stager.take_for_commit(uid)
    staged = update.tensors()
    assert update.version == 1 and set(staged) == set(SPECS) and len(update.files) == 2
    assert all(torch.equal(staged[k], t[k]) for k in SPECS)
    assert update.nbytes == sum(v.numel() * 4 for v in t.values())
    with pytest.raises(WeightUpdateError, match="not the update in progress"):
        stager.take_for_commit(uid)  # committed: gone
    update.discard()
    assert not update.directory.exists()


@pytest.mark.parametrize("tensors, message", [
    ({"a.wieght": torch.zeros(4, 3)}, r"tensor 'a.wieght': not a parameter"),
    ({"a.weight": torch.zeros(3, 4)}, r"tensor 'a.weight': shape \(3, 4\) does not match .* \(4, 3\)"),
    ({"a.weight": torch.zeros(4, 3, dtype=torch.int64)}, r"tensor 'a.weight': dtype torch.int64"),
    ({}, r"bucket 0: contains no tensors"),
])
def test_stager_rejects_bad_tensor_and_drops_update(tensors, message):
    stager = WeightStager(SPECS, torch.float32)
    uid = stager.begin(version=3, current_version=2)
    with pytest.raises(WeightUpdateError, match=message):
        stager.add_bucket(uid, 0, tensors)
    assert stager.in_progress is None  # a rejected update can never be committed
    with pytest.raises(WeightUpdateError, match="not the update in progress"):
        stager.take_for_commit(uid)


def test_stager_restore_takes_any_version_but_an_ordinary_push_must_be_newer():
    """A restore (a resumed trainer's checkpoint weights) may set the served version or an older one; without the
    flag the same version is refused; a negative version never is a step."""
    stager = WeightStager(SPECS, torch.float32)
    for version in (5, 2, 0):
        uid = stager.begin(version=version, current_version=5, restore=True)
        assert stager.in_progress == uid
        with pytest.raises(WeightUpdateError, match=f"version: {version} must be greater than the current weight "
                                                    "version 5"):
            stager.begin(version=version, current_version=5)
    with pytest.raises(WeightUpdateError, match="version: -1 is negative"):
        stager.begin(version=-1, current_version=5, restore=True)


def test_stager_version_and_duplicates():
    stager, t = WeightStager(SPECS, torch.float32), _tensors()
    with pytest.raises(WeightUpdateError, match="version: 2 must be greater than the current weight version 2"):
        stager.begin(version=2, current_version=2)
    with pytest.raises(WeightUpdateError, match="num_tensors: 7"):
        stager.begin(version=3, current_version=2, num_tensors=7)
    uid = stager.begin(version=3, current_version=2)
    stager.add_bucket(uid, 0, {"a.weight": t["a.weight"]})
    with pytest.raises(WeightUpdateError, match="already received in bucket 0"):
        stager.add_bucket(uid, 1, {"a.weight": t["a.weight"]})
    uid = stager.begin(version=3, current_version=2)
    assert len(_staged_dirs(stager, uid)) == 1
    newer = stager.begin(version=4, current_version=2)  # a restarted trainer replaces the abandoned update
    assert not _staged_dirs(stager, uid)  # its staged files are gone
    assert len(_staged_dirs(stager, newer)) == 1
    assert stager.in_progress == newer and not stager.abort(uid) and stager.abort(newer)
    assert not _staged_dirs(stager, newer)


def _staged_dirs(stager: WeightStager, update_id: str) -> list[Path]:
    """The staging directories of ``update_id`` on disk (rollout/protocol.py names them)."""
    root = Path(staging_root(stager.update_bytes()))
    return list(root.glob(f"{STAGING_DIR_PREFIX}{os.getpid()}-{update_id}-*"))


def test_stager_casts_to_engine_dtype():
    stager, t = WeightStager(SPECS, torch.bfloat16), _tensors()
    uid = stager.begin(version=1, current_version=0)
    stager.add_bucket(uid, 0, t)
    update = stager.take_for_commit(uid)
    staged = update.tensors()
    update.discard()
    assert all(v.dtype == torch.bfloat16 for v in staged.values())
    assert torch.equal(staged["a.weight"], t["a.weight"].to(torch.bfloat16))


def test_iter_buckets_bounds_size_and_round_trips():
    named = [(f"t{i}", torch.full((i + 1, 8), float(i))) for i in range(10)]  # 32*(i+1) bytes each
    buckets = list(iter_buckets(iter(named), bucket_bytes=200))
    assert [b.index for b in buckets] == list(range(len(buckets)))
    for b in buckets:  # a bucket exceeds the bound only when it holds one oversized tensor
        assert b.nbytes <= 200 or len(b.names) == 1
    got = {k: v for b in buckets for k, v in load(b.to_bytes()).items()}
    assert [n for b in buckets for n in b.names] == [n for n, _ in named]  # stream order kept
    assert sorted(got) == sorted(n for n, _ in named)
    assert all(torch.equal(got[n], t) for n, t in named)
    half = next(iter_buckets(iter(named[:2]), dtype=torch.bfloat16))
    assert all(v.dtype == torch.bfloat16 for v in load(half.to_bytes()).values())
    tied = torch.randn(4, 4)  # two names sharing storage (tied embeddings) still serialise
    assert len(load(next(iter_buckets([("x", tied), ("y", tied)])).to_bytes())) == 2
    with pytest.raises(ValueError, match="tensor 'z' is None"):
        list(iter_buckets([("z", None)]))
    with pytest.raises(ValueError, match="appears twice"):
        list(iter_buckets([("x", tied), ("x", tied)]))


def test_check_on_policy():
    samples = [[Sample([1], [-0.1], "length", 5)], [Sample([2], [-0.2], "stop", 5), Sample([3], [-0.3], "stop", 4)]]
    check_on_policy(samples, current_version=5, max_staleness=1)
    with pytest.raises(StaleRolloutError, match=r"1 of 3 rollouts .* version\(s\) \[4\] .* trainer is at version 5"):
        check_on_policy(samples, current_version=5)
    with pytest.raises(StaleRolloutError, match=r"3 of 3"):
        check_on_policy(samples, current_version=3, max_staleness=5)  # from the future: another run's weights


def test_generate_request_is_built_from_one_sampling_config(monkeypatch):
    """The client's ``/generate`` body takes its sampling fields from a ``config.SamplingConfig`` (a rollout section
    here, keyword replacements on top), and is a valid ``GenerateRequest``; top-k off (-1) goes out as None."""
    from megatron_opsd.config import RolloutConfig, SamplingConfig
    from megatron_opsd.rollout.protocol import GenerateRequest

    assert {f.name for f in dataclasses.fields(SamplingConfig)} <= set(GenerateRequest.model_fields)
    client, bodies = SidecarClient(["http://127.0.0.1:1"]), []
    monkeypatch.setattr(client, "request", lambda method, path, *a, json: bodies.append(json) or {"results": [[]]})
    rollout = RolloutConfig(n=3, temperature=0.7, top_p=0.9, top_k=-1, max_tokens=64)
    client.generate([[1, 2]], sampling=rollout, max_tokens=5, stop_token_ids=[0], seed=7)
    request = GenerateRequest(**bodies[0])
    assert (request.n, request.temperature, request.top_p, request.top_k, request.max_tokens, request.seed) == (
        3, 0.7, 0.9, None, 5, 7)
    client.generate([[1, 2]], n=2, top_k=4)  # no config: SamplingConfig's defaults
    assert (bodies[1]["n"], bodies[1]["top_k"], bodies[1]["temperature"]) == (2, 4, SamplingConfig.temperature)
    with pytest.raises(TypeError, match="tempreature"):
        client.generate([[1, 2]], tempreature=0.5)


def test_client_gives_clear_error_when_nothing_listens():
    url = f"http://127.0.0.1:{free_port()}"
    client = SidecarClient([url], retries=3, backoff_s=0.05, connect_timeout_s=1.0)
    start = time.perf_counter()
    with pytest.raises(SidecarError, match=r"POST /generate failed after 3 attempt\(s\).*127\.0\.0\.1.*ConnectError"):
        client.generate([[1, 2]], max_tokens=2)
    assert time.perf_counter() - start >= 0.05 + 0.1  # backed off between attempts
    with pytest.raises(SidecarError, match="not healthy after"):
        client.wait_healthy(timeout_s=0.5, poll_s=0.1)
    for bad, msg in [(dict(urls=[]), "urls"), (dict(urls=[url], dispatch="random"), "dispatch"),
                     (dict(urls=[url], transport="udp"), "transport"), (dict(urls=[url], retries=0), "retries")]:
        with pytest.raises(ValueError, match=msg):
            SidecarClient(**bad)


def test_sidecar_process_reports_startup_failure(tmp_path):
    from megatron_opsd.rollout.client import start_sidecar_process

    with pytest.raises(SidecarError, match=r"(?s)exited with code 2 during start-up.*not an HF checkpoint directory"):
        start_sidecar_process(tmp_path / "missing", startup_timeout_s=60, log_path=tmp_path / "log.txt")


@pytest.mark.parametrize("change, message", [
    (lambda n, s, d: (n[:-1], s[:-1], d[:-1]), r"names: 1 tensors of the served model are missing.*c\.weight"),
    (lambda n, s, d: (n[:-1] + ["c.bias"], s, d), r"tensor 'c\.bias': not a parameter"),
    (lambda n, s, d: (n, s[:-1] + [[2, 3]], d), r"tensor 'c\.weight': shape \(2, 3\) does not match .* \(2, 2\)"),
    (lambda n, s, d: (n, s, d[:-1] + ["bfloat16"]), r"tensor 'c\.weight': dtype bfloat16 differs from the served "),
    (lambda n, s, d: (n + ["a.weight"], s + [[4, 3]], d + ["float32"]), r"names: a tensor is announced twice"),
])
def test_announced_update_is_checked_before_anything_is_sent(change, message):
    """The collective transport's acceptance: the whole announced tensor list against the served checkpoint."""
    stager = WeightStager(SPECS, torch.float32)
    names, shapes, dtypes = list(SPECS), [list(s) for s, _ in SPECS.values()], ["float32"] * len(SPECS)
    stager.check_announced(names, shapes, dtypes)  # the complete, matching list passes
    with pytest.raises(WeightUpdateError, match=message) as err:
        stager.check_announced(*change(names, shapes, dtypes))
    assert err.value.status == 422


def test_collective_waits_are_bounded_per_bucket_from_the_measured_rate():
    """Every wait of a push covers one bucket, not the update: at 70B (141 GB of bf16) a 1 GiB bucket waits at
    most 60 s + 1 GiB at 50 MB/s (~81 s), far below torch's 10-minute NCCL default; a measured rate shortens it
    (a quarter of the rate is assumed), never below the 50 MB/s floor."""
    from megatron_opsd.rollout.transfer import wait_s

    assert wait_s(0, base_s=60) == 60
    assert wait_s(1 << 30, base_s=60) == pytest.approx(60 + (1 << 30) / 50e6) and wait_s(1 << 30, base_s=60) < 90
    assert wait_s(1 << 30, base_s=60, rate=4e9) == pytest.approx(60 + (1 << 30) / 1e9)
    assert wait_s(1 << 30, base_s=60, rate=1e6) == wait_s(1 << 30, base_s=60)


def test_both_ends_cut_the_announced_tensors_into_the_same_buckets():
    """The trainer and every worker compute the buckets from the announced sizes alone (no per-bucket metadata):
    consecutive tensors up to the bucket size, an oversized tensor alone, every tensor exactly once."""
    from megatron_opsd.rollout.transfer import plan_buckets

    sizes = [40, 40, 30, 200, 10, 10, 90, 5]
    plan = plan_buckets(sizes, 100)
    assert plan == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 8)]
    assert [i for a, b in plan for i in range(a, b)] == list(range(len(sizes)))
    assert all(sum(sizes[a:b]) <= 100 or b - a == 1 for a, b in plan)
    assert plan_buckets([], 100) == [] and plan_buckets(sizes, 10 ** 9) == [(0, len(sizes))]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(sizes, 0)


def test_staging_goes_where_the_whole_update_fits(tmp_path, monkeypatch):
    """A container's 64 MB /dev/shm must not take an update it cannot hold: staging falls back to the temp
    directory, and OPSD_STAGING_DIR overrides both."""
    import shutil
    import tempfile

    from megatron_opsd.rollout.sidecar.staging import STAGING_DIR_ENV, staging_root

    stager = WeightStager(SPECS, torch.float32)
    assert stager.update_bytes() == (12 + 5 + 4) * 4
    monkeypatch.delenv(STAGING_DIR_ENV, raising=False)
    free = shutil.disk_usage("/dev/shm").free
    assert staging_root(free // 2) == "/dev/shm"
    assert staging_root(free) == tempfile.gettempdir()  # needs 10% headroom
    monkeypatch.setenv(STAGING_DIR_ENV, str(tmp_path))
    uid = stager.begin(version=1, current_version=0)
    stager.add_bucket(uid, 0, _tensors())
    update = stager.take_for_commit(uid)
    assert update.directory.parent == tmp_path and len(list(tmp_path.iterdir())) == 1
    update.discard()


def test_removed_rollback_key_is_a_one_line_error_naming_what_replaced_it(tmp_path):
    """``rollout.keep_previous_weights`` (the host-copy rollback) is gone: in a YAML file or as --set it fails
    config loading with one line saying what a failed push does now, instead of "unknown key"."""
    from megatron_opsd.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  keep_previous_weights: false\n")
    for kwargs in (dict(path=str(path)), dict(overrides=["rollout.keep_previous_weights=true"])):
        with pytest.raises(ConfigError) as err:
            load_config(**kwargs)
        message = str(err.value)
        assert "\n" not in message and "rollout.keep_previous_weights" in message
        assert "rollout.push_retries" in message and "delete the key" in message
    assert load_config(overrides=["rollout.push_retries=0", "rollout.push_bucket_mb=64"]).rollout.push_retries == 0


def test_collective_host_is_the_address_on_the_route_to_the_sidecars(monkeypatch):
    """rollout.collective_host unset: loopback for local sidecars; else this host's address on its route to the
    first remote sidecar (tests/test_multihost.py runs it across network namespaces), never a 127.x address that
    a remote sidecar would connect to itself with, and a one-line error naming the key when there is no route."""
    from megatron_opsd.rollout.client import sidecar_client as client_module

    assert client_module.reachable_address(["http://127.0.0.1:8000", "http://localhost:8001"]) == "127.0.0.1"
    routes = {"node2": "10.0.0.5", "self-by-name": "127.0.1.1"}

    def route(peer):
        if peer not in routes:
            raise OSError("Name or service not known")
        return routes[peer]

    monkeypatch.setattr(client_module, "route_source_address", route)
    assert client_module.reachable_address(["http://127.0.0.1:8000", "http://node2:8000"]) == "10.0.0.5"
    for url, said in [("http://self-by-name:8000", "is this host (127.0.1.1)"), ("http://nowhere:8000", "no route")]:
        with pytest.raises(SidecarError, match="rollout.collective_host") as err:
            client_module.reachable_address([url])
        assert said in str(err.value) and "\n" not in str(err.value)
