"""Group a stream of named tensors into safetensors buckets of bounded size.

Each tensor is visited once and released as soon as its bucket is serialised, so pushing a model costs about
two buckets of extra host memory (the tensors of the bucket being filled plus its serialised bytes), never a
full copy of the model. A tensor larger than the bucket size travels alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024


@dataclass
class Bucket:
    index: int
    names: list[str]
    tensors: dict[str, torch.Tensor]
    nbytes: int

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save(self.tensors)


def iter_buckets(named_tensors: Iterable[tuple[str, Optional[torch.Tensor]]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Yield buckets of at most ``bucket_bytes`` (except single oversized tensors), cast to ``dtype`` if given."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes: {bucket_bytes} must be positive")
    tensors: dict[str, torch.Tensor] = {}
    size, index = 0, 0
    for name, tensor in named_tensors:
        if tensor is None:
            raise ValueError(f"tensor {name!r} is None: only the rank that holds full tensors may push weights")
        if name in tensors:
            raise ValueError(f"tensor {name!r} appears twice in the stream")
        # own, contiguous storage: safetensors refuses views and tensors that share memory (tied weights)
        tensor = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype, copy=True).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if tensors and size + nbytes > bucket_bytes:
            yield Bucket(index, list(tensors), tensors, size)
            tensors, size, index = {}, 0, index + 1
        tensors[name] = tensor
        size += nbytes
    if tensors:
        yield Bucket(index, list(tensors), tensors, size)
