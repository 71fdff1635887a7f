"""What runs inside vLLM's engine-core and tensor-parallel worker processes: the worker extension the sidecar calls
through ``collective_rpc`` (``extension.py``), the workers' end of the collective weight transport
(``collective.py``) and the ``vllm.general_plugins`` entry point that registers it (``vllm_plugin.py``). Imports
nothing of the trainer-side client or the sidecar server (tests/test_architecture.py)."""
