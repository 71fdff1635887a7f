"""NCCL weight transport (GPU only; UNTESTED on the CPU CI machine, see docs/sidecar.md).

The pattern of TRL's ``vllm_serve`` / vLLM's RL examples: the trainer's sending rank (rank 0) and every vLLM
worker of one sidecar form a ``StatelessProcessGroup`` (a TCP store, so no global torch.distributed state is
touched) with a ``PyNcclCommunicator`` on top. What TRL users hit is a silent hang when one side is missing or
the two sides disagree on what is sent; here:

* every control message (bucket metadata, the end marker) goes through the TCP store with a timeout, so a
  missing peer becomes a ``TimeoutError`` naming the step, not a hang;
* the receiver stages all tensors (host memory) and applies them only after the end marker: all or nothing;
* a receiver that rejects a tensor name/shape still drains the stream, so the trainer does not hang either,
  and the HTTP call returns 422 naming the tensor.

A broadcast that stalls after a successful handshake (a peer crashing mid-transfer) cannot be interrupted
in NCCL itself; the server answers 504 after ``timeout_s`` and the sidecar must be restarted.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional

import torch

END = "__end__"


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what}: the NCCL weight transport needs CUDA; on CPU use the HTTP bucket transport "
                           "(SidecarClient.push_weights / push_weights_from_iterator)")


def _group(host: str, port: int, rank: int, world_size: int, timeout_s: float, device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    try:
        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                             store_timeout=int(timeout_s))
    except Exception as err:  # noqa: BLE001 - torch raises several types for an unreachable store
        raise TimeoutError(f"NCCL weight group {host}:{port}: rank {rank}/{world_size} could not join within "
                           f"{timeout_s:.0f} s ({err}); are the trainer and all sidecar workers started?") from err
    return group, PyNcclCommunicator(group, device=device)


def _recv_obj(group, src: int, step: str, timeout_s: float):
    """``broadcast_obj`` through the TCP store; the store's timeout turns a missing sender into an error."""
    start = time.monotonic()
    try:
        return group.broadcast_obj(None, src=src)
    except Exception as err:  # noqa: BLE001
        raise TimeoutError(f"NCCL weight transport: no {step} from the trainer after "
                           f"{time.monotonic() - start:.0f} s (timeout {timeout_s:.0f} s): {err}") from err


class NcclWeightReceiver:
    """vLLM worker extension (``worker_extension_cls``): methods run in every worker via ``collective_rpc``."""

    def init_communicator(self, host: str, port: int, world_size: int, timeout_s: float = 120.0) -> None:
        _require_cuda("init_communicator")
        from vllm.distributed.parallel_state import get_world_group

        rank = 1 + get_world_group().rank  # the trainer's sender is rank 0
        self._opsd_timeout_s = timeout_s
        self._opsd_group, self._opsd_comm = _group(host, port, rank, world_size, timeout_s, self.device)

    def receive_and_load(self, specs: dict, timeout_s: float = 300.0) -> int:
        """Receive buckets until the end marker, validate against ``specs`` (name -> shape), then load all."""
        if getattr(self, "_opsd_comm", None) is None:
            raise RuntimeError("no NCCL communicator: POST /weights/nccl/init first")
        staged, error = [], None
        while True:
            metas = _recv_obj(self._opsd_group, 0, "bucket metadata", timeout_s)
            if metas == END:
                break
            for name, dtype, shape in metas:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self._opsd_comm.broadcast(tensor, src=0)
                expected = specs.get(name)
                if error is None and expected is None and name != "lm_head.weight":
                    error = f"tensor {name!r}: not a parameter of the served model"
                elif error is None and expected is not None and tuple(shape) != tuple(expected):
                    error = f"tensor {name!r}: shape {tuple(shape)} does not match the served model's {tuple(expected)}"
                if error is None:
                    staged.append((name, tensor.cpu()))
            torch.cuda.synchronize()
        if error:
            raise ValueError(error + "; nothing was applied")
        missing = set(specs) - {n for n, _ in staged}
        if missing:
            raise ValueError(f"{len(missing)} tensors not received, e.g. {sorted(missing)[:3]}; nothing was applied")
        self.reload_weights(weights_iterator=iter(staged))
        return len(staged)


class NcclWeightSender:
    """The trainer side (rank 0 of the group): stream HF-named CUDA tensors to one sidecar's workers."""

    def __init__(self, url: str, host: str, port: int, num_workers: int = 1, timeout_s: float = 120.0,
                 bucket_bytes: int = 256 * 1024 * 1024, device: Optional[int] = None):
        _require_cuda("NcclWeightSender")
        self.url, self.timeout_s, self.bucket_bytes = url.rstrip("/"), timeout_s, bucket_bytes
        self.host, self.port, self.world_size = host, port, 1 + num_workers
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self._group = self._comm = None

    def _post_async(self, path: str, body: dict, timeout_s: float):
        """POST in a thread: the sidecar's handler blocks until the collective on our side has run."""
        import threading

        import httpx

        box: dict = {}

        def run():
            try:
                resp = httpx.post(self.url + path, json=body, timeout=timeout_s + 30)
                box["resp"] = resp
            except httpx.HTTPError as err:
                box["error"] = err

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, box

    def _finish(self, thread, box, what: str) -> dict:
        thread.join(self.timeout_s + 60)
        if thread.is_alive() or "error" in box:
            raise TimeoutError(f"{self.url}{what}: no answer ({box.get('error', 'timed out')})")
        resp = box["resp"]
        if resp.status_code >= 400:
            raise RuntimeError(f"{self.url}{what}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def init(self) -> None:
        thread, box = self._post_async("/weights/nccl/init", dict(host=self.host, port=self.port,
                                                                  world_size=self.world_size,
                                                                  timeout_s=self.timeout_s), self.timeout_s)
        self._group, self._comm = _group(self.host, self.port, 0, self.world_size, self.timeout_s, self.device)
        self._finish(thread, box, "/weights/nccl/init")

    def push(self, named_tensors: Iterable[tuple[str, Optional[torch.Tensor]]], version: int,
             dtype: Optional[torch.dtype] = None) -> dict:
        """Broadcast the stream bucket by bucket, then wait for the sidecar to apply it as ``version``."""
        import httpx

        current = httpx.get(self.url + "/health", timeout=30).json()["weight_version"]
        if version <= current:  # refuse before broadcasting: a refused update would leave our broadcast hanging
            raise ValueError(f"version: {version} must be greater than the sidecar's weight version {current}")
        if self._comm is None:
            self.init()
        start = time.perf_counter()
        thread, box = self._post_async("/weights/nccl/update", dict(version=version, timeout_s=self.timeout_s),
                                       self.timeout_s)
        bucket, size = [], 0
        for name, tensor in named_tensors:
            tensor = tensor.detach().to(device=self.device, dtype=dtype or tensor.dtype).contiguous()
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                self._send(bucket)
                bucket, size = [], 0
        if bucket:
            self._send(bucket)
        self._group.broadcast_obj(END, src=0)
        result = self._finish(thread, box, "/weights/nccl/update")
        return dict(result, total_s=time.perf_counter() - start)

    def _send(self, bucket: list) -> None:
        self._group.broadcast_obj([(n, str(t.dtype).replace("torch.", ""), list(t.shape)) for n, t in bucket], src=0)
        for _, tensor in bucket:
            self._comm.broadcast(tensor, src=0)
        torch.cuda.synchronize(self.device)
