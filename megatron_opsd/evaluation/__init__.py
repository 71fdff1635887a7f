"""Benchmark evaluation: metrics and grading (pure Python), the runner (generation on a sidecar), reports.

Light on import: nothing heavy is imported here; see ``runner.evaluate`` and ``megatron-opsd eval``.
"""
