"""megatron_opsd: on-policy self-distillation for reasoning LLMs on megatron-core."""
import warnings

__version__ = "0.1.0"

# Warnings megatron-core 0.16.1 prints in every process (each rank, each spawned worker) whatever the user does,
# filtered here, before any of our modules imports megatron; every other warning is shown as before:
# - it falls back to torch implementations because Transformer Engine / Apex are not installed: the supported path
#   on CPU, and `megatron-opsd version` lists which of TE / Apex / torch serves each kernel (docs/gpu.md);
# - TransformerConfig's own default cuda_graph_scope="full" trips its own deprecation warning;
# - its tensor-parallel all-gather calls torch.distributed.all_gather_into_tensor, which torch 2.13 deprecates.
_EXPECTED = ((UserWarning, "Transformer Engine and Apex are not installed"),
             (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
             (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope"),
             (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"))
for _category, _message in _EXPECTED:
    warnings.filterwarnings("ignore", message=_message, category=_category)
