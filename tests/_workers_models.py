"""Per-rank worker functions for the model tests (top-level so run_distributed can pickle them).

Each worker handles several checkpoints in one spawn: starting 4 processes and importing megatron costs more
than the tiny models themselves.
"""
import torch

from megatron_opsd.models.check import logits_on_last_stage


def logits_of_many(hf_dirs: dict, tokens: torch.Tensor):
    """name -> our real-vocab logits on last-stage ranks, None elsewhere; at TP > 1 also ``(name, "sp")`` -> the
    logits with sequence parallelism."""
    from megatron.core import parallel_state as ps

    variants = (False, True) if ps.get_tensor_model_parallel_world_size() > 1 else (False,)
    out = {(name, "sp") if sp else name: logits_on_last_stage(path, tokens, sequence_parallel=sp)
           for name, path in hf_dirs.items() for sp in variants}
    return None if any(v is None for v in out.values()) else out


def export_many(pairs: dict, probe_dir: str, dst_rank: int) -> dict:
    """Import each HF dir and save it back (the probe twice, the second time over its first export, as one
    file); then iterate the probe model's tensors towards ``dst_rank``."""
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import iter_hf_tensors, load_hf_checkpoint, save_hf_checkpoint

    for src, out in pairs.items():
        chunks = build_model(src)
        load_hf_checkpoint(chunks, src)
        save_hf_checkpoint(chunks, out, source_dir=src, max_shard_bytes=64 * 1024)  # several shards + index
    chunks = build_model(probe_dir)
    load_hf_checkpoint(chunks, probe_dir)
    save_hf_checkpoint(chunks, pairs[probe_dir], source_dir=probe_dir)  # replaces an existing export atomically
    padded_rows_zero = True
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                start = param.shape[0] * _tp_rank()
                real_local = max(0, min(param.shape[0], chunk.real_vocab_size - start))
                padded_rows_zero &= bool((param[real_local:] == 0).all())
    items = list(iter_hf_tensors(chunks, dst_rank=dst_rank, dtype=torch.bfloat16))
    return {"items": items, "padded_rows_zero": padded_rows_zero}


def _tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def bad_inputs(cases: dict) -> dict:
    """name -> (fn name, kwargs): the error message each case raises on this rank ("" when it did not raise).

    Only non-collective failures are probed here, so one rank's error cannot hang the others.
    """
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint

    def load(path):
        load_hf_checkpoint(build_model(path), path)

    fns = {"build": lambda path, **kw: build_model(path, **kw), "load": lambda path: load(path)}
    out = {}
    for name, (fn, kwargs) in cases.items():
        try:
            fns[fn](**kwargs)
            out[name] = ""
        except Exception as err:  # noqa: BLE001 - the message is the thing under test
            out[name] = f"{type(err).__name__}: {err}"
    return out


def grads_with_recompute(hf_dir: str, tokens: torch.Tensor, granularities: tuple) -> dict:
    """granularity -> {param name: grad} of one forward/backward through megatron's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint

    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    out = {}
    for granularity in granularities:
        (model,) = build_model(hf_dir, recompute_granularity=granularity)
        load_hf_checkpoint([model], hf_dir)

        def step(_, m):
            logits = m(tokens, positions, attention_mask=None)
            return logits, lambda o: (o[..., : m.real_vocab_size].log_softmax(-1).mean(), {})

        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=model,
                                    num_microbatches=1, seq_length=tokens.shape[1],
                                    micro_batch_size=tokens.shape[0], forward_only=False)
        out[granularity] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out
