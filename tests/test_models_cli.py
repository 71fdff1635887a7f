"""`megatron-opsd check-model`: the user-facing parity check runs ranks and reports the logit difference."""
import re
import subprocess
import sys

import pytest


@pytest.mark.slow  # a subprocess that spawns 2 ranks; the same path as test_models_parity [tp2]
def test_check_model_cli_tp2(tiny_checkpoints):
    """`megatron-opsd check-model --tp 2` as a user runs it (subprocess, its own rank spawning, its report line):
    the parity numbers themselves are test_models_parity's, this proves the command around them."""
    out = subprocess.run([sys.executable, "-m", "megatron_opsd.cli", "check-model", "--model", tiny_checkpoints["qwen2"],
                          "--tp", "2", "--tokens", "8"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"TP=2 PP=1 VPP=None: max \|logits - transformers\| = (\S+) \(OK", out.stdout)
    assert match and float(match.group(1)) < 1e-4, out.stdout

