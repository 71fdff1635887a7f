"""Hugging Face safetensors <-> megatron-core GPTModel shards (Qwen3, Qwen2, Llama 3).

Every megatron parameter has a *recipe*: which HF tensors it is made of and how they are fused and sliced.
  copy   replicated (norms, q/k-norm)
  vocab  rows padded to the padded vocabulary, split over TP on dim 0 (embedding, lm head)
  row    split over TP on dim 1 (row-parallel: o_proj, down_proj)
  qkv    megatron's fused QKV, interleaved per query group: for each KV group [its q heads, k, v],
         then split over TP on dim 0 (groups are contiguous, so a TP shard holds whole groups)
  fc1    megatron's fused [gate; up], fused *per TP shard*: shard r = [gate_r; up_r]
Import reads only this rank's slices (``safe_open(...).get_slice``), one tensor at a time. Export gathers one
tensor at a time over TP and sends it from its pipeline stage to the destination rank.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_opsd.models.shape import ModelShape
from megatron_opsd.parallel import control


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


# megatron suffix inside a layer -> (sharding, HF suffixes inside model.layers.{i}.)
_LAYER_TABLE = {
    "input_layernorm.weight": ("copy", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("copy", ("input_layernorm.weight",)),  # TE spec
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": ("qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                               "self_attn.v_proj.bias")),
    "self_attention.q_layernorm.weight": ("copy", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("copy", ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("copy", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("copy", ("post_attention_layernorm.weight",)),  # TE spec
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}
_TOP_TABLE = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": ("copy", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}


@dataclass
class Recipe:
    megatron_name: str
    param: torch.nn.Parameter
    sharding: str  # how the HF tensors are fused and split over TP: copy | vocab | row | qkv | fc1 | shared
    hf_names: tuple


def hf_tensor_shapes(hf_config) -> dict:
    """Every tensor name of the HF checkpoint with its shape, in checkpoint order."""
    shape = ModelShape.from_hf_config(hf_config)
    h, hd, ffn = shape.hidden_size, shape.head_dim, shape.intermediate_size
    nq, nkv, v = shape.num_heads, shape.num_kv_heads, shape.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (nq * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (nkv * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (nkv * hd, h)
        if shape.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (nq * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (nkv * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (nkv * hd,)
        if shape.qk_layernorm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "self_attn.o_proj.weight"] = (h, nq * hd)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (ffn, h)
        shapes[p + "mlp.up_proj.weight"] = (ffn, h)
        shapes[p + "mlp.down_proj.weight"] = (h, ffn)
    shapes["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def recipes(chunk) -> list[Recipe]:
    """The recipe of every parameter of one (unwrapped) GPTModel chunk."""
    chunk = unwrap(chunk)
    tied = bool(getattr(chunk.hf_config, "tie_word_embeddings", False))
    out = []
    for name, param in chunk.named_parameters():
        if "_lora." in name:  # LoRA adapters: models/lora.py's lora_recipes
            continue
        if name.startswith("decoder.layers."):
            local_idx, suffix = name[len("decoder.layers."):].split(".", 1)
            layer = chunk.decoder.layers[int(local_idx)].layer_number - 1
            if suffix not in _LAYER_TABLE:
                raise KeyError(f"no HF mapping for megatron parameter {name!r}")
            sharding, hf_suffixes = _LAYER_TABLE[suffix]
            hf_names = tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes)
        elif name in _TOP_TABLE:
            sharding, hf_names = _TOP_TABLE[name]
            if name == "output_layer.weight" and tied:  # last stage's copy of the tied embedding (PP > 1)
                hf_names = ("model.embed_tokens.weight",)
        else:
            raise KeyError(f"no HF mapping for megatron parameter {name!r}")
        out.append(Recipe(name, param, sharding, hf_names))
    return out


# ----------------------------------------------------------------------------------------------- import
class _SafetensorsReader:
    """Lazy access to the tensors of a (possibly sharded) HF safetensors checkpoint."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").exists():
            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir} has no model.safetensors or model.safetensors.index.json")
        self.weight_map = weight_map
        self._open = {}
        self._safe_open = safe_open

    def slice(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"checkpoint {self.dir} is missing tensor {name!r} (expected for this architecture); "
                           f"re-export the checkpoint or check config.json")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = self._safe_open(str(self.dir / file), "pt")
        return self._open[file].get_slice(name)

    def shape(self, name: str) -> tuple:
        return tuple(self.slice(name).get_shape())


def _rows(reader, name, lo, hi) -> torch.Tensor:
    return reader.slice(name)[lo:hi]


def local_shard(recipe: Recipe, reader: _SafetensorsReader, hf_config, tp: int, rank: int) -> torch.Tensor:
    """Build this TP rank's shard of ``recipe.param`` from the checkpoint, reading only what it owns."""
    names, sharding = recipe.hf_names, recipe.sharding
    if sharding in ("copy", "shared"):  # shared: one replicated tensor stored under several HF names (LoRA's A)
        return reader.slice(names[0])[:]
    if sharding == "vocab":
        rows = recipe.param.shape[0]
        lo, real = rank * rows, hf_config.vocab_size
        out = torch.zeros(rows, recipe.param.shape[1], dtype=recipe.param.dtype)  # padded rows stay zero
        if lo < real:
            part = _rows(reader, names[0], lo, min(lo + rows, real))
            out[: part.shape[0]] = part
        return out
    if sharding == "row":
        n = reader.shape(names[0])[1] // tp
        return reader.slice(names[0])[:, rank * n:(rank + 1) * n]
    if sharding == "fc1":
        n = reader.shape(names[0])[0] // tp
        return torch.cat([_rows(reader, nm, rank * n, (rank + 1) * n) for nm in names], dim=0)
    if sharding == "qkv":
        shape = ModelShape.from_hf_config(hf_config)
        hd, ng = shape.head_dim, shape.num_kv_heads
        q_per_group = shape.num_heads // ng
        g0, g1 = rank * ng // tp, (rank + 1) * ng // tp
        q = _rows(reader, names[0], g0 * q_per_group * hd, g1 * q_per_group * hd)
        k = _rows(reader, names[1], g0 * hd, g1 * hd)
        v = _rows(reader, names[2], g0 * hd, g1 * hd)
        tail = q.shape[1:]
        groups = [q.reshape(g1 - g0, q_per_group * hd, *tail), k.reshape(g1 - g0, hd, *tail),
                  v.reshape(g1 - g0, hd, *tail)]
        return torch.cat(groups, dim=1).reshape(-1, *tail)
    raise ValueError(sharding)


def load_hf_checkpoint(model_chunks, hf_dir) -> None:
    """Load an HF checkpoint into this rank's chunks, reading only the slices this rank owns."""
    from megatron.core import parallel_state as ps

    reader = _SafetensorsReader(hf_dir)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for chunk in model_chunks:
        hf_config = unwrap(chunk).hf_config
        expected = hf_tensor_shapes(hf_config)
        for recipe in recipes(chunk):
            for name in recipe.hf_names:
                got = reader.shape(name)
                if got != tuple(expected[name]):
                    raise ValueError(f"tensor {name!r} in {hf_dir} has shape {got}, config.json implies "
                                     f"{tuple(expected[name])}")
            shard = local_shard(recipe, reader, hf_config, tp, rank)
            if tuple(shard.shape) != tuple(recipe.param.shape):
                raise ValueError(f"{recipe.megatron_name}: built shard {tuple(shard.shape)} != parameter "
                                 f"{tuple(recipe.param.shape)}")
            with torch.no_grad():
                recipe.param.copy_(shard.to(recipe.param.dtype))


# ----------------------------------------------------------------------------------------------- export
def full_tensors(recipe: Recipe, shards: list, hf_config) -> dict:
    """HF tensors rebuilt from the TP shards of one megatron parameter."""
    names, sharding = recipe.hf_names, recipe.sharding
    if sharding == "copy":
        return {names[0]: shards[0]}
    if sharding == "shared":
        return {name: shards[0] for name in names}
    if sharding == "vocab":
        return {names[0]: torch.cat(shards, 0)[: hf_config.vocab_size]}
    if sharding == "row":
        return {names[0]: torch.cat(shards, 1)}
    if sharding == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return {names[0]: torch.cat([h[0] for h in halves], 0), names[1]: torch.cat([h[1] for h in halves], 0)}
    if sharding == "qkv":
        shape = ModelShape.from_hf_config(hf_config)
        hd, ng = shape.head_dim, shape.num_kv_heads
        qpg = shape.num_heads // ng
        full = torch.cat(shards, 0)
        tail = full.shape[1:]
        grouped = full.reshape(ng, qpg + 2, hd, *tail)
        return {names[0]: grouped[:, :qpg].reshape(ng * qpg * hd, *tail),
                names[1]: grouped[:, qpg].reshape(ng * hd, *tail),
                names[2]: grouped[:, qpg + 1].reshape(ng * hd, *tail)}
    raise ValueError(sharding)


def gather_tp(tensor: torch.Tensor) -> list:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(out, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
    return out


def iter_hf_tensors(model_chunks, *, dst_rank: int = 0, dtype: Optional[torch.dtype] = None
                    ) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """COLLECTIVE over the world: yields ``(hf_name, full tensor)`` on ``dst_rank``, ``(hf_name, None)`` elsewhere.

    One megatron parameter at a time is gathered over TP on its pipeline stage and sent to ``dst_rank``, so
    no rank ever holds more than one full tensor group. Names come in the HF checkpoint's order on every rank.
    Tensors are on the model's device (CUDA with NCCL, which cannot receive into CPU memory; CPU on gloo).
    """
    from megatron.core import parallel_state as ps

    dist = torch.distributed
    hf_config = unwrap(model_chunks[0]).hf_config
    shapes = hf_tensor_shapes(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    local = {}  # first HF name of a recipe -> recipe (this rank's chunks)
    for chunk in model_chunks:
        for recipe in recipes(chunk):
            if tied and recipe.megatron_name == "output_layer.weight":
                continue  # the embedding exports it
            local[recipe.hf_names[0]] = recipe
    world = dist.get_world_size() if dist.is_initialized() else 1
    me = dist.get_rank() if dist.is_initialized() else 0
    # Who sends each recipe: the rank with TP rank 0 and DP rank 0 on the owning stage.
    is_sender = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 \
        and ps.get_context_parallel_rank() == 0
    owned = sorted(local) if is_sender else []
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, owned)
    else:
        everyone = [owned]
    sender_of = {name: r for r, names in enumerate(everyone) for name in names}
    out_dtype = dtype or next(iter(local.values())).param.dtype
    device = next(iter(local.values())).param.device
    for first_name in [n for n in shapes if n in sender_of]:
        src = sender_of[first_name]
        recipe = local.get(first_name)
        full = {}
        if recipe is not None:  # this rank's stage owns it: gather over TP
            full = full_tensors(recipe, gather_tp(_export_view(recipe.param)), hf_config)
            hf_names = list(full)
        else:
            hf_names = [first_name] + _siblings(first_name, shapes)
        for name in hf_names:
            tensor = None
            if me == dst_rank:
                if src == me:
                    tensor = full[name].to(out_dtype).contiguous()
                else:
                    tensor = torch.empty(shapes[name], dtype=out_dtype, device=device)
                    dist.recv(tensor, src=src)
            elif me == src:
                dist.send(full[name].to(out_dtype).contiguous(), dst=dst_rank)
            yield name, tensor


def _export_view(param: torch.nn.Parameter) -> torch.Tensor:
    """What is exported for a parameter: itself, or base + scale * B A where a LoRA adapter is on (models/lora.py)."""
    adapter = getattr(param, "lora_adapter", None)
    if adapter is None or adapter.mode == "off":
        return param.detach()
    with torch.no_grad():
        return adapter.merged_weight(param.detach())


def _siblings(first_name: str, shapes: dict) -> list:
    """The other HF tensors fused into the same megatron parameter as ``first_name``."""
    for _, hf_suffixes in _LAYER_TABLE.values():
        if len(hf_suffixes) > 1 and first_name.endswith(hf_suffixes[0]):
            prefix = first_name[: -len(hf_suffixes[0])]
            return [prefix + s for s in hf_suffixes[1:] if prefix + s in shapes]
    return []


def save_hf_checkpoint(model_chunks, out_dir, *, source_dir=None, max_shard_bytes: int = 2**30,
                       dst_rank: int = 0, dtype: Optional[torch.dtype] = None) -> None:
    """COLLECTIVE: write an HF checkpoint (safetensors shards + index + config + tokenizer) atomically.

    ``dst_rank`` writes each shard as soon as it reaches ``max_shard_bytes``, so it holds at most one shard in
    memory; everything goes to a temporary sibling directory renamed onto ``out_dir`` at the end. All ranks
    return once the directory is in place.
    """
    from safetensors.torch import save_file

    dist = torch.distributed
    me = dist.get_rank() if dist.is_initialized() else 0
    out_dir = Path(out_dir)
    tmp = None
    if me == dst_rank:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    files, current, size, total = [], {}, 0, 0  # files: (temporary name, tensor names)

    def flush():
        name = f"part-{len(files):05d}.safetensors"
        save_file(current, str(tmp / name), metadata={"format": "pt"})
        files.append((name, list(current)))

    try:
        for name, tensor in iter_hf_tensors(model_chunks, dst_rank=dst_rank, dtype=dtype):
            if tensor is None:
                continue
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                current, size = {}, 0
            current[name] = tensor.cpu()
            size, total = size + nbytes, total + nbytes
        if me == dst_rank:
            flush()
            _finish_hf_dir(tmp, out_dir, files, total, unwrap(model_chunks[0]).hf_config, source_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    control.barrier()  # the others wait (gloo, long timeout) while rank 0 writes the whole model


def _finish_hf_dir(tmp: Path, out_dir: Path, files: list, total: int, hf_config, source_dir) -> None:
    """Final shard names, index, config and tokenizer files in ``tmp``, then rename it onto ``out_dir``."""
    weight_map = {}
    for i, (part, names) in enumerate(files):
        final = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp / part, tmp / final)
        weight_map.update({n: final for n in names})
    if len(files) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config.save_pretrained(str(tmp))
    if source_dir is not None:
        for f in Path(source_dir).iterdir():
            tokenizer_file = "token" in f.name or f.suffix == ".model" or f.name in (
                "chat_template.jinja", "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
            if f.is_file() and tokenizer_file:
                shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, out_dir)


def _user_umask() -> int:
    mask = os.umask(0o022)  # the only portable read of the umask is setting it; restored at once
    os.umask(mask)
    return mask


def _apply_umask(tmp: Path) -> None:
    """``mkdtemp`` creates its directory ``0700`` and ``copy2`` keeps the source's mode: give the finished export
    the modes a plain ``mkdir`` / ``open`` would (``0777`` / ``0666`` less the user's umask), so others in the
    user's group can read a model as they can any other file the user writes."""
    mask = _user_umask()
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` onto ``out_dir`` (with the user's umask), replacing an older one without a
    moment with neither."""
    _apply_umask(tmp)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
