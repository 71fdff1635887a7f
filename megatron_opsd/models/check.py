"""`megatron-opsd check-model`: our sharded megatron model vs transformers on the same tokens."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (local processes)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (local processes)")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved 1F1B)")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of the random test batch")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (fp32)")


def main(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_opsd.models.gpt import load_hf_config
    from megatron_opsd.models.weights import logits_on_last_stage
    from megatron_opsd.parallel import ParallelConfig
    from megatron_opsd.parallel.launch import run_distributed

    config = load_hf_config(args.model)
    torch.manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, args.tokens))
    cfg = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                         virtual_pipeline_model_parallel_size=args.vpp)
    results = run_distributed(logits_on_last_stage, args.tp * args.pp, cfg, args.model, tokens)
    ours = next(r for r in results if r is not None)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()(tokens).logits
    diff = (ours - ref).abs().max().item()
    ok = diff < args.tolerance
    print(f"TP={args.tp} PP={args.pp} VPP={args.vpp}: max |logits - transformers| = {diff:.3e} "
          f"({'OK' if ok else 'MISMATCH'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1
