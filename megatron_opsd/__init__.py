"""megatron_opsd: on-policy self-distillation for reasoning LLMs on megatron-core."""
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Warnings megatron-core 0.16.1 prints in every process (each rank, each spawned worker) whatever the user does,
# filtered here, before any of our modules imports megatron; every other warning is shown as before:
# - it falls back to torch implementations because Transformer Engine / Apex are not installed (six notices in a
#   process that builds a model, measured with `megatron-opsd check-model`: megatron_fsdp's mixed precision, three
#   optimizer modules, models/backends.py, the GPT layer specs): the supported path on CPU, and `megatron-opsd
#   version` lists which of TE / Apex / torch serves each kernel (docs/gpu.md); where it matters, a GPU without TE,
#   one warning of ours says so when the model is built (models/families.py warn_local_spec_on_gpu);
# - TransformerConfig's own default cuda_graph_scope="full" trips its own deprecation warning;
# - its tensor-parallel all-gather and its gradient reduce-scatter call torch.distributed.all_gather_into_tensor and
#   reduce_scatter_tensor, which torch 2.13 deprecates.
_EXPECTED = ((UserWarning, "Transformer Engine and Apex are not installed"),
             (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
             (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope"),
             (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
             (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated"))
for _category, _message in _EXPECTED:
    warnings.filterwarnings("ignore", message=_message, category=_category)


class _EagerMegatronJitOnCPU(importlib.abc.MetaPathFinder):
    """Makes megatron-core's ``jit_fuser`` a no-op when CUDA is absent, before any megatron module applies it.

    megatron/core/jit.py sets ``jit_fuser = torch.compile`` at import ("if is_torch_min_version("2.2.0a0"):
    jit_fuser = torch.compile"), and about a dozen modules decorate with it as megatron.core is imported, which
    imports torch._dynamo and torch._inductor: 1.3 s of every CPU process's ~2.7 s megatron import, measured here.
    No CPU run calls a decorated function compiled (dynamo's frame counters stay empty), and on CPU they would
    run eagerly anyway under megatron's own ``disable_jit_fuser``. With CUDA nothing changes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "megatron.core.jit":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            import torch
            if not torch.cuda.is_available() and hasattr(module, "disable_jit_fuser"):
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module
        return spec


if "megatron.core.jit" not in sys.modules:
    sys.meta_path.insert(0, _EagerMegatronJitOnCPU())
