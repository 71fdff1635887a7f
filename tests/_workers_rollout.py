"""Per-rank workers for the sidecar tests (top-level so run_distributed can pickle them)."""
import torch


def _megatron_model(hf_dir: str) -> list:
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint

    chunks = build_model(hf_dir)
    load_hf_checkpoint(chunks, hf_dir)
    return chunks


def push_changed_weights(hf_dir: str, url: str, version: int, bucket_bytes: int, out_path: str):
    """Perturb every megatron parameter, push with ``SidecarClient.push_weights`` (collective) and save what
    the export produced on rank 0 as the HF reference."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_opsd.models.weights import iter_hf_tensors
    from megatron_opsd.rollout.client import SidecarClient

    chunks = _megatron_model(hf_dir)
    gen = torch.Generator().manual_seed(1234)  # same stream on every rank: replicated params stay identical
    with torch.no_grad():
        for param in chunks[0].parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    with SidecarClient(url, bucket_bytes=bucket_bytes) as client:
        stats = client.push_weights(chunks, version)
    reference = {name: t for name, t in iter_hf_tensors(chunks) if t is not None}
    if dist.get_rank() == 0:
        save_file(reference, out_path)
    return stats


def megatron_logprobs(hf_dir: str, sequences: list, prompt_lens: list) -> list:
    """Log-prob our megatron model (full vocabulary, gathered over TP) gives each response token."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunks = _megatron_model(hf_dir)
    out = []
    with torch.no_grad():
        for seq, plen in zip(sequences, prompt_lens):
            tokens = torch.tensor([seq])
            logits = chunks[0](tokens, torch.arange(len(seq)).unsqueeze(0), attention_mask=None)
            logits = gather_from_tensor_model_parallel_region(logits)[0, :, : chunks[0].real_vocab_size]
            logp = logits.float().log_softmax(-1)
            out.append([logp[plen - 1 + i, t].item() for i, t in enumerate(seq[plen:])])
    return out
