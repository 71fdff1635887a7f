"""The CPU demo: a tiny reasoning task that OPSD visibly compresses."""
