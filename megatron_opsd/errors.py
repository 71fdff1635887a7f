"""The error a person fixes by changing the command line or the config (not a bug in the code).

``megatron-opsd`` prints it as one line, ``megatron-opsd: error: <message>`` (the message names the field),
once per job (rank 0 only when every rank of a distributed run hits it; the job's first rank to report it when a
rank finds it after the process group is up, while the ranks it leaves waiting stop with status 2 and no traceback:
``parallel.control.report_usage_error``), and exits with status 2 as argparse does; ``--debug`` or ``OPSD_DEBUG=1``
shows the traceback instead. Anything else keeps its traceback.
"""
from __future__ import annotations

DEBUG_ENV = "OPSD_DEBUG"


class UsageError(ValueError):
    """A config, input or layout error; the message starts with the field it is about."""
