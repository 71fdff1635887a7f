"""The sidecar process (``megatron-opsd sidecar``): vLLM's OpenAI server with our routes mounted (``server.py``),
what it passes to vLLM (``engine.py``), who may call it (``auth.py``), the staging of HTTP/shm weight updates
(``staging.py``), LoRA adapter updates (``lora.py``) and the clean-up of dead runs' files (``leftovers.py``).
Imports nothing of the trainer-side client or the vLLM worker extension (tests/test_architecture.py)."""
