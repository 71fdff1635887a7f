"""Pipeline-aware forward/backward and teacher-logits collection over megatron's schedules, and replica helpers.

``forward_backward`` and ``collect_logits`` drive ``megatron.core.pipeline_parallel.get_forward_backward_func()``
(no pipelining, 1F1B at PP > 1, interleaved 1F1B with virtual stages) with a list of microbatch dicts; on the
last pipeline stage the caller's ``loss_fn(logits, microbatch)`` sees this rank's vocabulary shard of the
logits, ``[batch, seq, padded_vocab / TP]`` (GPTModel returns batch-first); a loss that needs per-micro-batch
state reads ``microbatch["index"]``, which ``batches.response_microbatches`` stamps (not ``id(microbatch)``). At PP > 1
every microbatch of one call must be padded to the same ``seq_length``: the schedules run with
``variable_seq_lengths=False`` (gloo pairs point-to-point messages in posting order; variable shapes add a shape
exchange that we do not rely on). At PP = 1 there is no point-to-point message, and lengths may differ.

``copy_weights_`` / ``FP32EMA`` act on two replicas sharded the same way (frozen / refreshed / EMA teacher),
shard-locally, with no communication. The EMA's average lives in fp32 (``FP32EMA``): with decay 0.999 the per-step
increment ``(1 - decay) * (student - ema)`` is far below half a bf16 ulp of most weights, so an update in bf16
rounds almost every update away (measured: 99.9% of entries never move over 300 steps; tests/test_ema_teacher.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_opsd.models.gpt import unwrap
from megatron_opsd.parallel.device import current_device

LossFn = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, dict]"]
LOSS_REDUCTIONS = ("mean", "sum")


@dataclass
class ForwardBackwardOutput:
    """``loss``: the reduced loss on every rank (see ``forward_backward``); ``metrics``: one dict per microbatch
    (the loss_fn's metrics plus ``"loss"``) on the last pipeline stage, empty elsewhere."""

    loss: float
    metrics: list = field(default_factory=list)


def _position_ids(microbatch: dict) -> torch.Tensor:
    tokens = microbatch["tokens"]
    if microbatch.get("position_ids") is not None:
        return microbatch["position_ids"]
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def model_forward(model, microbatch: dict) -> torch.Tensor:
    """One chunk's forward of one micro-batch (logits on the last stage): the schedules' step and the PP=1
    teacher forward (``response_rows.response_rows``) share it."""
    return model(microbatch["tokens"], _position_ids(microbatch), attention_mask=microbatch.get("attention_mask"))


def recast_fp8_weights(model_chunks: list) -> None:
    """Make Transformer Engine re-cast each chunk's cached FP8 weights from its current weights at the chunk's next
    forward: megatron's ``MegatronModule.set_is_first_microbatch()`` (a no-op unless ``config.fp8``), the call
    megatron's schedules make before a step's first micro-batch (schedules.py ``forward_step``: ``if
    is_first_microbatch and hasattr(model, 'set_is_first_microbatch'): model.set_is_first_microbatch()``). TE
    otherwise keeps its first cast: megatron's TE linears pass ``is_first_microbatch`` to TE and then set it False,
    and TE casts only when ``update_workspace = is_first_microbatch is None or is_first_microbatch``
    (docs/gpu.md). A teacher forward outside the schedules (PP=1) must call this after each teacher update."""
    for chunk in model_chunks:
        if hasattr(chunk, "set_is_first_microbatch"):
            chunk.set_is_first_microbatch()


def _validate(microbatches: list, seq_length: int, micro_batch_size: int, one_length: bool) -> None:
    if not microbatches:
        raise ValueError("microbatches is empty: pass at least one microbatch dict")
    for i, mb in enumerate(microbatches):
        if "tokens" not in mb:
            raise ValueError(f"microbatch {i} has no 'tokens' entry (a [batch, seq] LongTensor)")
        shape = tuple(mb["tokens"].shape)
        if one_length and shape != (micro_batch_size, seq_length):
            raise ValueError(f"microbatch {i}: tokens shape {shape} != (micro_batch_size, seq_length) = "
                             f"({micro_batch_size}, {seq_length}); pad every microbatch of a step to one length")
        if shape[0] != micro_batch_size:
            raise ValueError(f"microbatch {i}: tokens shape {shape} has batch {shape[0]} != micro_batch_size = "
                             f"{micro_batch_size}")


def _run_schedule(model_chunks: list, microbatches: list, on_logits: Callable, *, seq_length: int,
                  micro_batch_size: int, forward_only: bool) -> list:
    """Runs the schedule; ``on_logits(index, logits, microbatch) -> (loss, metrics)`` on the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pp = ps.get_pipeline_model_parallel_world_size()
    _validate(microbatches, seq_length, micro_batch_size, one_length=pp > 1)
    if len(model_chunks) > 1 and len(microbatches) % pp:
        # megatron 0.16.1 schedules.py forward_backward_pipelining_with_interleaving: "The remainder of M (the
        # total micro-batches) divided by N (number of contiguous micro-batches in a virtual pipeline stage)
        # should be 0, or larger than or equal to the pipeline-parallel size" (N defaults to PP)
        raise ValueError(f"{len(microbatches)} micro-batches for an interleaved pipeline at PP={pp}: pad them to a "
                         "multiple of PP (batches.response_microbatches' microbatch_multiple="
                         "ParallelConfig.microbatch_multiple())")

    def forward_step(data_iterator, model):
        index, mb = next(data_iterator)
        return model_forward(model, mb), lambda logits: on_logits(index, logits, mb)

    iterators = [iter(list(enumerate(microbatches))) for _ in model_chunks]
    single = len(model_chunks) == 1
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators[0] if single else iterators,
        model=model_chunks[0] if single else model_chunks, num_microbatches=len(microbatches),
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)


def _broadcast_from_last_stage(value: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return value


def forward_backward(model_chunks: list, microbatches: list, loss_fn: LossFn, *, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False,
                     loss_reduction: str = "mean") -> ForwardBackwardOutput:
    """Forward (and backward unless ``forward_only``) of all microbatches through the pipeline schedule.

    Each microbatch is a dict with ``tokens`` ``[micro_batch_size, seq_length]``, optional ``position_ids`` (default
    0..seq-1) and ``attention_mask`` (default None = causal), plus anything ``loss_fn`` needs. Gradients
    accumulate into the DDP grad buffers; the caller zeroes them and steps the optimizer.

    ``loss_reduction``: ``"mean"`` (megatron's convention): the gradient is that of the mean of ``loss_fn`` over
    microbatches and data-parallel ranks. ``"sum"``: the gradient is that of the sum over microbatches and DP
    ranks — use it when ``loss_fn`` already weights tokens by a global normaliser (e.g. 1 / all response
    tokens of the step). ``loss`` of the result is reduced the same way and is valid on every rank.
    """
    from megatron.core import parallel_state as ps

    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
    dp = ps.get_data_parallel_world_size()
    # The schedule divides by num_microbatches and DDP averages over DP: undo both for "sum".
    scale = len(microbatches) * dp if loss_reduction == "sum" else 1

    def on_logits(index: int, logits: torch.Tensor, mb: dict):
        loss, metrics = loss_fn(logits, mb)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
        # A clone: the schedule divides the returned tensor in place.
        return loss.clone() * scale if scale != 1 else loss.clone(), {**metrics, "loss": loss.detach().clone()}

    metrics = _run_schedule(model_chunks, microbatches, on_logits, seq_length=seq_length,
                            micro_batch_size=micro_batch_size, forward_only=forward_only)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    total = torch.zeros(1, dtype=torch.float64, device=current_device())  # NCCL needs device tensors
    if last:
        total += sum(float(m["loss"]) for m in metrics)
        if loss_reduction == "mean":
            total /= len(microbatches) * dp
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    _broadcast_from_last_stage(total)
    return ForwardBackwardOutput(loss=total.item(), metrics=list(metrics) if last else [])


def select_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    if positions.dtype == torch.bool:  # [batch, seq] mask -> [n_selected, vocab_shard]
        return logits[positions]
    if positions.dim() != 2:  # [batch, k] sequence indices -> [batch, k, vocab_shard]
        raise ValueError(f"gather positions must be a [batch, seq] bool mask or [batch, k] indices, got shape "
                         f"{tuple(positions.shape)}")
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


@torch.no_grad()
def collect_logits(model_chunks: list, microbatches: list, *, seq_length: int, micro_batch_size: int,
                   gather_positions_key: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None) -> Optional[list]:
    """Forward-only pass (no grad) returning, on the last pipeline stage, each microbatch's logits in order.

    Logits are this rank's vocabulary shard, ``[batch, seq, padded_vocab / TP]``; with ``gather_positions_key``
    only the positions in ``microbatch[key]`` are kept (a bool mask -> ``[n, vocab/TP]``, indices ``[batch, k]``
    -> ``[batch, k, vocab/TP]``), to save memory. ``dtype`` casts them (None: as computed). ``None`` on the
    other stages.
    """
    from megatron.core import parallel_state as ps

    stored: dict = {}

    def on_logits(index: int, logits: torch.Tensor, mb: dict):
        if gather_positions_key is not None:
            if gather_positions_key not in mb:
                raise ValueError(f"microbatch {index} has no {gather_positions_key!r} entry (gather_positions_key)")
            logits = select_positions(logits, mb[gather_positions_key])
        stored[index] = logits.to(dtype) if dtype is not None else logits
        return logits.new_zeros(()), {}

    _run_schedule(model_chunks, microbatches, on_logits, seq_length=seq_length, micro_batch_size=micro_batch_size,
                  forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return [stored[i] for i in range(len(microbatches))]


def _parameter_pairs(dst_chunks: list, src_chunks: list):
    if len(dst_chunks) != len(src_chunks):
        raise ValueError(f"replicas have {len(dst_chunks)} and {len(src_chunks)} model chunks: build both with the "
                         "same parallel layout")
    for i, (dst, src) in enumerate(zip(dst_chunks, src_chunks)):
        dst_params, src_params = dict(unwrap(dst).named_parameters()), dict(unwrap(src).named_parameters())
        if dst_params.keys() != src_params.keys():
            diff = sorted(dst_params.keys() ^ src_params.keys())
            raise ValueError(f"chunk {i}: replicas have different parameters ({diff[:4]}...): same model and layout?")
        for name, d in dst_params.items():
            s = src_params[name]
            if d.shape != s.shape:
                raise ValueError(f"chunk {i} {name}: shard shapes {tuple(d.shape)} vs {tuple(s.shape)}: the replicas "
                                 "must be sharded the same way (same TP/PP/VPP)")
            yield d, s


@torch.no_grad()
def copy_weights_(dst_chunks: list, src_chunks: list) -> None:
    """``dst <- src`` for every local parameter shard (hard teacher refresh). If ``dst`` has an optimizer with
    separate fp32 main parameters, call its ``reload_model_params()`` afterwards."""
    for d, s in _parameter_pairs(dst_chunks, src_chunks):
        d.copy_(s)


class FP32EMA:
    """An EMA teacher whose average lives in fp32: ``shadow <- decay * shadow + (1 - decay) * src`` in fp32 for
    every local shard, then ``ema <- shadow`` rounded to the replica's dtype (what the teacher forward uses).

    fp32 parameters are their own shadow (no copy). The source is the student's model parameters (the weights
    the rollouts come from), not the optimizer's fp32 main parameters: those are sharded over DP by the
    distributed optimizer, and the student's bf16 weights are the model whose average the teacher is. Memory:
    4 bytes per local parameter of a bf16 replica (the replica itself holds 2). ``checkpoint_chunks()`` hands the
    shadows to ``save_checkpoint``/``load_checkpoint`` as an extra model, so a resume keeps the fp32 average.
    """

    def __init__(self, ema_chunks: list):
        self.chunks = ema_chunks
        self.shadows = {}  # id(replica parameter) -> its fp32 shadow (the parameter itself when fp32)
        with torch.no_grad():
            for chunk in ema_chunks:
                for p in unwrap(chunk).parameters():
                    self.shadows[id(p)] = p if p.dtype == torch.float32 else p.detach().float().clone()

    @property
    def has_copies(self) -> bool:
        """False when every replica parameter is fp32 (nothing extra to keep or checkpoint)."""
        return any(self.shadows[id(p)] is not p for chunk in self.chunks for p in unwrap(chunk).parameters())

    def shadow_tensors(self) -> list:
        """The fp32 shadows in the replica's parameter order."""
        return [self.shadows[id(p)] for chunk in self.chunks for p in unwrap(chunk).parameters()]

    @torch.no_grad()
    def update_(self, src_chunks: list, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        for e, s in _parameter_pairs(self.chunks, src_chunks):
            shadow = self.shadows[id(e)]
            shadow.mul_(decay).add_(s.to(shadow.dtype), alpha=1.0 - decay)
            if shadow is not e:
                e.copy_(shadow)

    def checkpoint_chunks(self) -> list:
        """One stand-in per chunk for ``extra_models`` of the checkpoint functions (their sharded state dicts
        are the replica's, with each parameter's tensor replaced by its fp32 shadow)."""
        return [_ShadowChunk(chunk, self.shadows) for chunk in self.chunks]


class _ShadowChunk:
    """A model chunk as the checkpoint functions see it (``sharded_state_dict``/``load_state_dict``), whose
    tensors are the fp32 EMA shadows of the replica chunk's parameters (same keys, shapes and sharding)."""

    def __init__(self, chunk, shadows: dict):
        self.chunk, self.shadows = unwrap(chunk), shadows
        self.by_pointer = {p.data_ptr(): shadows[id(p)] for p in self.chunk.parameters()}

    def sharded_state_dict(self, prefix: str = "") -> dict:
        from dataclasses import replace

        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        out = {}
        for key, item in self.chunk.sharded_state_dict(prefix=prefix).items():
            data = getattr(item, "data", None)
            shadow = self.by_pointer.get(data.data_ptr()) if isinstance(data, torch.Tensor) else None
            if shadow is None or shadow.shape != data.shape:
                continue  # not a parameter (e.g. TE extra state): the replica's own entry keeps it
            if isinstance(item, ShardedTensor):
                out[key] = replace(item, data=shadow, dtype=shadow.dtype)
            elif isinstance(item, ShardedTensorFactory):
                out[key] = replace(item, data=shadow)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        named = dict(self.chunk.named_parameters())
        missing = [name for name in named if name not in state]
        if strict and missing:
            raise KeyError(f"the checkpoint has no fp32 EMA shadow for {missing[:4]}...: was it saved by an older "
                           "version? resume from a step-N saved with teacher.weights=ema")
        for name, p in named.items():
            if name in state:
                self.shadows[id(p)].copy_(state[name])
                if self.shadows[id(p)] is not p:
                    p.copy_(self.shadows[id(p)])
