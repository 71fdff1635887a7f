"""Install and launcher smoke test: ``torchrun ... -m megatron_opsd.models.smoke --tp 2``.

Initialises torch.distributed + megatron from the launcher's variables (torchrun or srun), builds a tiny
random Qwen3 GPTModel at the requested TP and prints a checksum of its gathered logits on rank 0. The weights
come from ``torch.manual_seed`` with megatron's CPU initialisation (full master weight, then sliced), so on CPU
the checksum is the same for every TP size: a multi-node TP=2 run must print what a single process prints.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.error
import urllib.request

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_opsd.errors import UsageError
from megatron_opsd.models.gpt import build_model
from megatron_opsd.models.tiny import tiny_hf_config
from megatron_opsd.parallel.device import to_device
from megatron_opsd.parallel.distributed import ParallelConfig, destroy_distributed, init_distributed


def run(tp: int, seed: int = 0, tokens: int = 16) -> dict:
    torch.set_num_threads(1)
    info = init_distributed(ParallelConfig(tensor_model_parallel_size=tp, seed=seed))
    try:
        torch.manual_seed(seed)
        model = build_model(tiny_hf_config("qwen3", vocab_size=512))[0].eval()
        batch = to_device({"tokens": torch.randint(0, 512, (2, tokens), generator=torch.Generator().manual_seed(seed)),
                           "position_ids": torch.arange(tokens).unsqueeze(0).expand(2, -1)})
        with torch.no_grad():
            logits = gather_from_tensor_model_parallel_region(
                model(batch["tokens"], batch["position_ids"], attention_mask=None))
        logits = logits[..., :512].double()
        result = {"rank": info["RANK"], "world": info["WORLD_SIZE"], "tp": tp, "dp": info["DATA_PARALLEL_SIZE"],
                  "host": socket.gethostname(), "sum": logits.sum().item(),
                  "abs_sum": logits.abs().sum().item(), "tp_rank": ps.get_tensor_model_parallel_rank()}
        torch.distributed.barrier()
    finally:
        destroy_distributed()
    return result


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
        secret = os.environ.get("OPSD_SIDECAR_SECRET")  # the launcher's run secret (rollout/auth.py), if any
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
