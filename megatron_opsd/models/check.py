"""`megatron-opsd check-model`: our sharded megatron model vs transformers on the same tokens (the per-rank worker
``logits_on_last_stage`` also serves the parity tests)."""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from megatron_opsd.models.gpt import build_model, load_hf_config
from megatron_opsd.models.weights import load_hf_checkpoint
from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (local processes)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (local processes)")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved 1F1B)")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of the random test batch")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (fp32)")


def main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM  # heavy: only when the check runs

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


def logits_on_last_stage(hf_dir: str, tokens: torch.Tensor, sequence_parallel: bool = False) -> Optional[torch.Tensor]:
    """Per-rank worker: real-vocabulary logits of the model in ``hf_dir`` on the last stage (gathered over TP).

    Runs megatron's own pipeline schedule (1F1B or interleaved), one sequence per micro-batch; with
    ``sequence_parallel`` (TP > 1) the sequence length must be a multiple of TP.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunks = build_model(hf_dir, sequence_parallel=sequence_parallel)
    load_hf_checkpoint(chunks, hf_dir)
    device = next(chunks[0].parameters()).device
    tokens = tokens.to(device)
    b, s = tokens.shape
    positions = torch.arange(s, device=device).unsqueeze(0)
    outputs = []

    def forward_step(data_iterator, model):
        out = model(next(data_iterator), positions, attention_mask=None)

        def loss_func(output):
            outputs.append(gather_from_tensor_model_parallel_region(output).detach())
            return output.sum() * 0, {}

        return out, loss_func

    micro_batches = [tokens[i:i + 1] for i in range(b)]
    iterators = [iter(micro_batches) for _ in chunks]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=b, seq_length=s, micro_batch_size=1,
            forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat(outputs, 0)[..., : chunks[0].real_vocab_size].float().cpu()
