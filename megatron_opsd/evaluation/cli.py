"""``megatron-opsd eval``: accuracy, pass@k and response length on MATH-500 / AIME 2024 / AMC 2023 (or any
JSONL with problem/answer fields), optionally against a baseline run; writes results.json, report.md and
accuracy_vs_tokens.png. See docs/evaluation.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_opsd.evaluation.runner import BENCHMARKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="HF checkpoint directory (config.json + safetensors + tokenizer) or a megatron-opsd training "
                             "checkpoint (step-N or its checkpoints folder: exported to <out>/model_hf first)")
    parser.add_argument("--benchmarks", default="math500,aime24,amc23",
                        help=f"comma-separated names ({', '.join(BENCHMARKS)}) and/or JSONL paths with problem/answer "
                             "fields")
    parser.add_argument("--data-dir", default=None, help="folder holding math500/test.jsonl ... (default: "
                                                         "$OPSD_DATA_DIR, else the copy shipped with the package)")
    parser.add_argument("--out", default="eval_out", help="output folder for results.json, report.md, the PNG")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (pass@k for k = 1, 2, 4, ..., n)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="response token budget per sample (default: 1024, or less so that the longest prompt "
                             "plus the budget fits the model's context: --max-model-len, else config.json's "
                             "max_position_embeddings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts per benchmark")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="chat template enable_thinking (Qwen3); default: the template's own default")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--prompt-template", default=None,
                        help="Jinja user turn with {{ problem }} (default: problem + 'put your final answer within "
                             "\\boxed{}')")
    parser.add_argument("--no-boxed-only", dest="boxed_only", action="store_false",
                        help="grade the whole response instead of only the last \\boxed{} answer")
    parser.add_argument("--baseline", default=None, help="results.json of an earlier run to compare against")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the baseline CIs")
    parser.add_argument("--save-text", action="store_true", help="keep every response's text in results.json")
    parser.add_argument("--batch-prompts", type=int, default=8, help="prompts per generation request")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    side = parser.add_argument_group("sidecar (a local one is started on --model unless --sidecar-url is given)")
    side.add_argument("--sidecar-url", default=None,
                      help="reuse running `megatron-opsd sidecar`(s) serving --model (comma-separated replicas; their "
                           "secret from $OPSD_SIDECAR_SECRET or the file $OPSD_SIDECAR_SECRET_FILE names)")
    side.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (use float32 on CPU for tests)")
    side.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    side.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    side.add_argument("--tensor-parallel-size", type=int, default=1)
    side.add_argument("--sidecar-log", default=None, help="where the local sidecar writes its log")


def is_training_checkpoint(path: Path) -> bool:
    return (path / "opsd_checkpoint.json").is_file() or (path / "latest").is_file()


def _resolve_model(model: str, out_dir: str) -> Path:
    """An HF directory as is; a training checkpoint (step-N dir or checkpoints root) exported to
    ``<out>/model_hf`` first, so the sidecar can serve it."""
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model!r} is not a directory; give an HF directory or a training checkpoint")
    if (path / "config.json").is_file():
        return path
    if is_training_checkpoint(path):
        from megatron_opsd.training.export_cli import export_checkpoint

        return export_checkpoint(path, Path(out_dir) / "model_hf")
    raise FileNotFoundError(f"--model {model!r} has no config.json and is no training checkpoint; give an HF "
                            "directory or a megatron-opsd checkpoint (step-N or its checkpoints folder)")


def run(args: argparse.Namespace) -> dict:
    """Everything ``main`` does, returning the output paths and results (for tests and scripts)."""
    from dataclasses import replace

    from megatron_opsd.config import DataConfig
    from megatron_opsd.evaluation.report import load_results, write_report
    from megatron_opsd.evaluation.runner import (DEFAULT_MAX_TOKENS, EvalSettings, evaluate_model_dir,
                                                 fitting_max_tokens, load_benchmark, resolve_benchmarks)
    from megatron_opsd.models.gpt import load_hf_config
    from megatron_opsd.models.tokenizer import load_tokenizer

    data = DataConfig(system_prompt=args.system_prompt)
    if args.prompt_template is not None:
        data = replace(data, prompt_template=args.prompt_template)
    settings = EvalSettings(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens, seed=args.seed, enable_thinking=args.thinking,
                            boxed_only=args.boxed_only, limit=args.limit, prompts_per_request=args.batch_prompts,
                            save_text=args.save_text, progress=args.progress, data=data)
    # Fail on bad input before the sidecar spends a minute starting.
    benchmarks = resolve_benchmarks(args.benchmarks, args.data_dir)
    for path in benchmarks.values():
        load_benchmark(path, data, limit=1)
    baseline = load_results(args.baseline) if args.baseline else None
    model_dir = _resolve_model(args.model, args.out)
    if args.max_tokens is None:
        context = args.max_model_len or load_hf_config(model_dir).max_position_embeddings
        settings = replace(settings, max_tokens=fitting_max_tokens(context, load_tokenizer(str(model_dir)),
                                                                   benchmarks, settings))
        print(f"--max-tokens {settings.max_tokens} (fits the model's {context}-token context)", flush=True)
    urls = [u for u in args.sidecar_url.split(",") if u.strip()] if args.sidecar_url else None
    try:
        results = evaluate_model_dir(model_dir, [str(p) if n not in BENCHMARKS else n for n, p in benchmarks.items()],
                                     settings, data_dir=args.data_dir, sidecar_urls=urls, log_path=args.sidecar_log,
                                     dtype=args.dtype, max_model_len=args.max_model_len,
                                     kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                                     tensor_parallel_size=args.tensor_parallel_size)
    except Exception as err:  # keep what finished: a later benchmark's failure does not discard it
        partial = getattr(err, "partial_results", None)
        if partial and partial["benchmarks"]:
            paths = write_report(partial, args.out, baseline=baseline, n_boot=args.bootstrap, seed=args.seed)
            print(f"kept the finished benchmarks ({', '.join(partial['benchmarks'])}) in {paths['json']}",
                  file=sys.stderr, flush=True)
        raise
    paths = write_report(results, args.out, baseline=baseline, n_boot=args.bootstrap, seed=args.seed)
    return {"paths": paths, "results": results}


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.rollout.client import SidecarError

    try:
        out = run(args)
    except (ValueError, FileNotFoundError, SidecarError) as err:
        print(f"megatron-opsd eval: error: {err}", file=sys.stderr)
        return 2
    print(out["paths"]["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in out["paths"].values() if p is not None))
    return 0
