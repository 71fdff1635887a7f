"""Install and launcher smoke test: ``torchrun ... -m megatron_opsd.models.smoke --tp 2``.

Initialises torch.distributed + megatron from the launcher's variables (torchrun or srun), builds a tiny
random Qwen3 GPTModel at the requested TP and prints a checksum of its gathered logits on rank 0. The checksum is
the same for every TP size, on CPU and on GPU: a multi-node TP=2 run must print what a single process prints.

The weights are not megatron's random initialisation: that is TP-independent only on CPU. megatron-core's
``ModelParallelConfig.use_cpu_initialization`` (False on GPU, ``models/families.py``) says: "CPU initialization is
the same regardless of tensor model parallelism, but GPU initialization is not" (on GPU each shard is drawn
``with get_cuda_rng_tracker().fork()``, whose model-parallel seed differs per TP rank; Transformer Engine's layers
do the same). Instead every rank draws one full set of HF-named weights from ``--seed`` and loads it through the
trainer's own HF loader (``load_hf_checkpoint``), which slices each tensor for its TP rank.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from safetensors.torch import save_file

from megatron_opsd.errors import UsageError
from megatron_opsd.models.gpt import build_model
from megatron_opsd.models.tiny import tiny_hf_config
from megatron_opsd.models.weights import hf_tensor_shapes, load_hf_checkpoint
from megatron_opsd.parallel.device import to_device
from megatron_opsd.parallel.distributed import ParallelConfig, destroy_distributed, init_distributed


def run(tp: int, seed: int = 0, tokens: int = 16) -> dict:
    torch.set_num_threads(1)
    info = init_distributed(ParallelConfig(tensor_model_parallel_size=tp, seed=seed))
    try:
        result = {"rank": info["RANK"], "world": info["WORLD_SIZE"], "tp": tp, "dp": info["DATA_PARALLEL_SIZE"],
                  "host": socket.gethostname(), **logits_checksum(seed, tokens),
                  "tp_rank": ps.get_tensor_model_parallel_rank()}
        torch.distributed.barrier()
    finally:
        destroy_distributed()
    return result


def logits_checksum(seed: int = 0, tokens: int = 16, seeded_weights: bool = True) -> dict:
    """Sum and absolute sum of the tiny model's gathered logits on a seeded batch (megatron initialised);
    ``seeded_weights=False`` keeps megatron's own random initialisation (tests show it is TP-dependent on GPU)."""
    torch.manual_seed(seed)
    chunks = build_model(tiny_hf_config("qwen3", vocab_size=512))
    if seeded_weights:
        load_seeded_weights(chunks, seed)
    model = chunks[0].eval()
    batch = to_device({"tokens": torch.randint(0, 512, (2, tokens), generator=torch.Generator().manual_seed(seed)),
                       "position_ids": torch.arange(tokens).unsqueeze(0).expand(2, -1)})
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(
            model(batch["tokens"], batch["position_ids"], attention_mask=None))
    logits = logits[..., :512].double()
    return {"sum": logits.sum().item(), "abs_sum": logits.abs().sum().item()}


def seeded_hf_tensors(hf_config, seed: int) -> dict:
    """One full random set of the HF checkpoint's tensors from ``seed`` (same on every rank, host and device)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(hf_config).items():
        tensor = 0.02 * torch.randn(tuple(shape), generator=gen)
        tensors[name] = tensor + 1.0 if name.endswith("norm.weight") else tensor
    return tensors


def load_seeded_weights(chunks: list, seed: int) -> None:
    """``seeded_hf_tensors`` into this rank's shards through the HF loader (a node-local temporary file)."""
    with tempfile.TemporaryDirectory(prefix="opsd-smoke-") as tmp:
        save_file(seeded_hf_tensors(chunks[0].hf_config, seed), str(Path(tmp) / "model.safetensors"))
        load_hf_checkpoint(chunks, tmp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_opsd.models.smoke", description=__doc__)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size must be a multiple)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="trainer-style overrides; rollout.sidecar_urls=... makes rank 0 check each /health")
    args, ignored = parser.parse_known_args(argv)  # stands in for `megatron-opsd train` in launch-script tests
    try:
        r = run(args.tp, args.seed)
    except UsageError as err:  # e.g. --tp 2 in one process: say how to start the ranks instead of a traceback
        print(f"{parser.prog}: error: {err}; start one process per rank, e.g. torchrun --nproc-per-node "
              f"{args.tp} -m megatron_opsd.models.smoke --tp {args.tp}", file=sys.stderr)
        return 2
    print(f"smoke rank={r['rank']} host={r['host']} world={r['world']} TP={r['tp']} DP={r['dp']} "
          f"tp_rank={r['tp_rank']} logits_sum={r['sum']:.6f} logits_abs_sum={r['abs_sum']:.6f}", flush=True)
    if args.overrides:
        print(f"smoke rank={r['rank']} overrides: {' '.join(args.overrides)}", flush=True)
    if ignored:
        print(f"smoke rank={r['rank']} ignored arguments: {' '.join(ignored)}", flush=True)
    urls = [u for o in args.overrides if o.startswith("rollout.sidecar_urls=")
            for u in o.split("=", 1)[1].split(",") if u]
    if r["rank"] == 0:
        secret = os.environ.get("OPSD_SIDECAR_SECRET")  # the launcher's run secret (rollout/secret.py), if any
        for url in urls:
            print(f"smoke sidecar {url}/health -> {_get(url, '/health')}", flush=True)
            print(f"smoke sidecar {url}/v1/models -> {_get(url, '/v1/models', secret)} with the run's secret, "
                  f"{_get(url, '/v1/models')} without", flush=True)
    return 0


def _get(url: str, path: str, secret: str | None = None) -> str:
    request = urllib.request.Request(url.rstrip("/") + path, headers={"Authorization": f"Bearer {secret}"}
                                     if secret else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except OSError as err:
        return f"unreachable ({err})"


if __name__ == "__main__":
    sys.exit(main())
