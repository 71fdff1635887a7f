"""The vLLM rollout sidecar, split by the process each module runs in (docs/sidecar.md, docs/architecture.md):

- ``client/``: the trainer process (``SidecarClient``, starting a local sidecar, the trainer's end of each weight
  transport);
- ``sidecar/``: the sidecar's server process (``megatron-opsd sidecar``: vLLM's server with our routes);
- ``worker/``: vLLM's engine-core and TP worker processes (the worker extension, the workers' end of the
  collective transport, the vLLM plugin);
- shared by them, and importing none of them: ``protocol.py`` (HTTP bodies, headers, file names), ``secret.py``
  (the run's secret and the keys derived from it), ``transfer.py`` (the collective transport's wire) and
  ``environment.py`` (the environment vLLM needs).

This package imports nothing itself, so that a sidecar or a vLLM worker importing its modules never loads the client.
"""
