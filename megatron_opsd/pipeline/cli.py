"""`megatron-opsd pipeline --config P.yaml [key=value ...]`: run the stages in order, evaluate each model, print the
table. Re-running the same command continues where a crashed run stopped."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML (see examples/pipeline_tiny.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pipeline key, e.g. --set eval.limit=50 (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra-style overrides")


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.config import ConfigError
    from megatron_opsd.pipeline import PipelineError, load_pipeline_config, run_pipeline

    try:
        run_pipeline(load_pipeline_config(args.config, list(args.sets) + list(args.overrides)))
    except (ConfigError, PipelineError) as err:
        print(f"megatron-opsd pipeline: error: {err}", file=sys.stderr)
        return 2
    return 0
