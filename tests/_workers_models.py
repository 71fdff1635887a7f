"""Per-rank worker functions for the model tests (top-level so run_distributed can pickle them)."""
import torch


def our_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits of our megatron model on the last pipeline stage (gathered over TP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint

    chunks = build_model(hf_dir)
    load_hf_checkpoint(chunks, hf_dir)
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    outputs = []

    def forward_step(data_iterator, model):
        out = model(tokens, positions, attention_mask=None)

        def loss_func(output):
            outputs.append(gather_from_tensor_model_parallel_region(output).detach())
            return output.sum() * 0, {}

        return out, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([None])] * len(chunks) if len(chunks) > 1 else iter([None]),
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1, seq_length=s, micro_batch_size=b,
            forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return outputs[0][..., : chunks[0].real_vocab_size]


def export_round_trip(hf_dir: str, out_dir: str) -> None:
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint, save_hf_checkpoint

    chunks = build_model(hf_dir)
    load_hf_checkpoint(chunks, hf_dir)
    save_hf_checkpoint(chunks, out_dir, source_dir=hf_dir)


def build_only(hf_dir: str) -> None:
    from megatron_opsd.models.gpt import build_model

    build_model(hf_dir)


def load_only(hf_dir: str) -> None:
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint

    load_hf_checkpoint(build_model(hf_dir), hf_dir)
