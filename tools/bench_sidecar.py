"""Benchmark the rollout sidecar: generation tokens/s vs. HF ``generate`` and at 1 / 8 concurrent clients, and
weight-update latency vs. size for every transport at sidecar TP=1 and TP=2.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_sidecar.py [--batch 32 --max-tokens 128] [--tp 1 2]
        [--clients 1 8] [--baseline /path/to/older/checkout] [--markdown docs/benchmarks.md]
    cd /tmp && HF_HUB_OFFLINE=1 PYTHONPATH=CHECKOUT .venv/bin/python CHECKOUT/tools/bench_sidecar.py
        --push-compare /path/to/older/checkout [--sizes h1024-L8] [--tp 1 2] [--markdown docs/benchmarks.md]

Both generators run the same random tiny Qwen3 checkpoint in fp32 on the same batch, with sampling at
temperature 1 and EOS ignored so every sample has ``max_tokens`` tokens. The sidecar's time is measured by the
client, HTTP included. vLLM's CPU backend runs on one torch thread, so HF gets one thread as well
(``--hf-threads`` to change). With ``--markdown FILE`` the results replace the section between this tool's
markers in FILE (other sections are left alone).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Solve 2+2 = 4. What is 3*7? 21.",
         "hello world, numbers 0123456789, boxed answers and reasoning steps"] * 20
BEGIN, END = "<!-- bench_sidecar:begin -->", "<!-- bench_sidecar:end -->"
PUSH_BEGIN, PUSH_END = "<!-- bench_sidecar_push:begin -->", "<!-- bench_sidecar_push:end -->"
SIZES = {  # name -> tiny_hf_config kwargs
    "h256-L4": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32, intermediate_size=768),
    "h512-L8": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536),
    "h1024-L8": dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64,
                     intermediate_size=3072),
}


def make_model(root: Path, name: str, max_len: int, sizes: dict = SIZES) -> Path:
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(root / name, family="qwen3", tokenizer_texts=TEXTS, max_position_embeddings=max_len,
                                   **sizes[name])


def bench_generation(client, model_dir: Path, batch: int, prompt_len: int, max_tokens: int, hf_threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 300, (batch, prompt_len), generator=gen).tolist()
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


def sidecar(model_dir: Path, max_len: int, tp: int, pythonpath: str | None = None):
    """A sidecar at tensor parallel ``tp`` (on CPU one core per worker: VLLM_CPU_OMP_THREADS_BIND="0|1"), running
    the megatron_opsd found on ``pythonpath`` (default: this one; another checkout for a baseline)."""
    from megatron_opsd.rollout.client import start_sidecar_process

    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp))} if tp > 1 else {}
    env.update({"PYTHONPATH": pythonpath} if pythonpath else {})
    return start_sidecar_process(model_dir, dtype="float32", max_model_len=max_len, tensor_parallel_size=tp, env=env,
                                 startup_timeout_s=1800)


def bench_concurrency(servers: dict, clients: list[int], requests: int, max_tokens: int, tp: int = 1,
                      rounds: int = 3) -> list[dict]:
    """Generation tokens/s with K clients each sending ``requests`` one-prompt requests at once. ``servers``:
    label -> (SidecarClient, routes), routes among ``/generate`` and ``/v1/completions`` (token-id prompts).
    The servers run at the same time and are measured in alternation, ``rounds`` times (median kept), so a
    change of the shared machine's load hits all of them alike."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from megatron_opsd.rollout.client.auth import bearer

    def request(client, route: str, k: int, i: int) -> int:
        if route == "/generate":
            return len(client.generate([[5 + k, 6 + i, 7]], max_tokens=max_tokens, seed=i, ignore_eos=True)[0][0]
                       .token_ids)
        body = dict(model=client.health()["model"], prompt=[5 + k, 6 + i, 7], max_tokens=max_tokens, seed=i,
                    ignore_eos=True, logprobs=0, temperature=1.0)
        return httpx.post(client.urls[0] + route, json=body, timeout=600,
                          headers=bearer(client.secret)).json()["usage"]["completion_tokens"]

    cases = [(label, route, k) for k in clients for label, (_, routes) in servers.items() for route in routes]
    for label, route, _ in cases:
        request(servers[label][0], route, 0, 0)  # warm-up
    runs: dict = {case: [] for case in cases}
    for _ in range(rounds):
        for label, route, k in cases:
            client = servers[label][0]
            start = time.perf_counter()
            with ThreadPoolExecutor(k) as pool:
                tokens = sum(pool.map(lambda c: sum(request(client, route, c, i) for i in range(requests)), range(k)))
            runs[(label, route, k)].append((time.perf_counter() - start, tokens))
    rows = []
    for (label, route, k), measured in runs.items():
        seconds = statistics.median(s for s, _ in measured)
        rows.append(dict(server=label, route=route, tp=tp, clients=k, tokens=measured[0][1], seconds=seconds,
                         tok_s=measured[0][1] / seconds))
    return rows


def bench_updates(client, model_dir: Path, repeats: int, tp: int = 1) -> list[dict]:
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    rows = []
    version = client.health()["weight_version"]
    for transport in ("http", "shm", "collective"):  # every transport reaches every TP worker
        client.transport = transport
        runs = []
        for _ in range(repeats):
            version += 1
            runs.append(client.push_weights_from_iterator(iter(state.items()), version))
        best = min(runs, key=lambda r: r["total_s"])
        rows.append(dict(transport=transport, tp=tp, mb=best["bytes"] / 1e6, tensors=best["tensors"],
                             buckets=best["buckets"], transfer_s=best.get("transfer_s", float("nan")),
                             apply_s=best["apply_s"], total_s=best["total_s"],
                             mb_per_s=best["bytes"] / 1e6 / best["total_s"]))
    return rows


def push_worker(url: str, model_dir: str, repeats: int, bucket_mb: int) -> None:
    """``--push-worker``: the trainer side of ``--push-compare``, in a process running whichever checkout's
    megatron_opsd is on PYTHONPATH; prints the best of ``repeats`` collective pushes as JSON."""
    from safetensors.torch import load_file

    from megatron_opsd.rollout.client import SidecarClient

    state = load_file(str(Path(model_dir) / "model.safetensors"))
    options = {"bucket_bytes": bucket_mb << 20} if bucket_mb else {}
    with SidecarClient(url, transport="collective", sync_timeout_s=300, **options) as client:
        version = client.health()["weight_version"]
        runs = [client.push_weights_from_iterator(iter(state.items()), version + 1 + i) for i in range(repeats)]
    best = min(runs, key=lambda r: r["total_s"])
    print(json.dumps(dict(mb=best["bytes"] / 1e6, buckets=best["buckets"], total_s=best["total_s"],
                          mb_per_s=best["bytes"] / 1e6 / best["total_s"])))


def bench_push_compare(models: dict, tps: list[int], repeats: int, max_len: int, baseline: str) -> list[dict]:
    """The collective push of this checkout (its default 1 GiB buckets, and 64 MiB) against ``baseline``'s, one
    sidecar at a time (idle vLLM workers still poll), each pushed to by its own checkout's client."""
    import subprocess

    if (Path.cwd() / "megatron_opsd").is_dir():  # `python -m` puts the cwd first: it would shadow PYTHONPATH
        raise SystemExit("--push-compare: run from a directory without megatron_opsd/ (e.g. cd /tmp), with "
                         "PYTHONPATH=this checkout, so that each sidecar imports the checkout it is given")
    here = str(Path(__file__).resolve().parents[1])
    rows = []
    for name, model_dir in models.items():
        for tp in tps:
            for label, path, buckets in ((f"baseline ({baseline})", baseline, [0]), ("this checkout", here, [0, 64])):
                with sidecar(model_dir, max_len, tp, path) as proc:
                    for bucket_mb in buckets:
                        out = subprocess.run([sys.executable, __file__, "--push-worker", proc.url, str(model_dir),
                                              str(repeats), str(bucket_mb)], env=dict(os.environ, PYTHONPATH=path),
                                             capture_output=True, text=True, timeout=1800)
                        if out.returncode:
                            raise RuntimeError(f"{label} push failed: {out.stderr[-3000:]}\n{proc.log_tail()}")
                        row = dict(json.loads(out.stdout.strip().splitlines()[-1]), model=name, tp=tp, code=label,
                                   bucket=f"{bucket_mb} MiB" if bucket_mb else "default")
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    return rows


def push_markdown(rows: list[dict]) -> str:
    lines = [PUSH_BEGIN, "## Collective weight push, before and after (`tools/bench_sidecar.py --push-compare`)", "",
             f"CPU (vllm-cpu 0.32.0, fp32, gloo), 2 cores **shared with other jobs** (load average "
             f"{os.getloadavg()[0]:.0f} when written; run under `flock /tmp/opsd-heavy.lock`, so no other heavy job "
             "ran at the same time, but light ones did): only ratios within this run mean anything, and the lead may "
             "re-measure on an idle machine. Best of repeats; start -> every worker loaded -> version confirmed. "
             f"Command: `{command_line()}`.", "",
             "| model | sidecar TP | code | buckets | MB | bucket count | total s | MB/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['tp']} | {r['code']} | {r['bucket']} | {r['mb']:.0f} | {r['buckets']} | "
              f"{r['total_s']:.3f} | {r['mb_per_s']:.0f} |" for r in rows]
    return "\n".join(lines + [PUSH_END]) + "\n"


def to_markdown(gen: dict, updates: dict, concurrency: list) -> str:
    lines = [BEGIN, "## Rollout sidecar (`tools/bench_sidecar.py`)", "",
             f"CPU (vllm-cpu 0.32.0, fp32), 2 cores **shared with other jobs** (load average {os.getloadavg()[0]:.0f} "
             "when the section was written), so only ratios within one run mean anything. "
             f"Tiny Qwen3 `{gen['model']}`; batch {gen['batch']} "
             f"prompts x {gen['prompt_len']} tokens, {gen['max_tokens']} sampled tokens each (EOS ignored), "
             f"HF `generate` on {gen['hf_threads']} thread(s) like vLLM's CPU worker.", "",
             "| generator | tokens | seconds | tokens/s |", "|---|---|---|---|",
             f"| sidecar (HTTP incl.) | {gen['sidecar_tokens']} | {gen['sidecar_s']:.2f} | {gen['sidecar_tok_s']:.0f} |",
             f"| HF generate | {gen['hf_tokens']} | {gen['hf_s']:.2f} | {gen['hf_tok_s']:.0f} |", "",
             f"Sidecar / HF tokens/s ratio: **{gen['speedup']:.1f}x**.", "",
             "Weight update, best of repeats (http/shm: begin -> all buckets -> commit applied; collective: "
             "start -> ready -> broadcast -> every worker loaded; 64 MiB buckets):", "",
             "| model | sidecar TP | transport | MB | buckets | transfer s | apply s | total s | MB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in updates.items():
        for r in rows:
            lines.append(f"| {name} | {r['tp']} | {r['transport']} | {r['mb']:.1f} | {r['buckets']} | "
                         f"{r['transfer_s']:.3f} | {r['apply_s']:.3f} | {r['total_s']:.3f} | {r['mb_per_s']:.0f} |")
    if concurrency:
        lines += ["", "Generation with K concurrent clients, each sending one-prompt requests (servers up at the same "
                  "time, measured in alternation, median of rounds):", "",
                  "| server | route | sidecar TP | clients | tokens | seconds | tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['server']} | {r['route']} | {r['tp']} | {r['clients']} | {r['tokens']} | {r['seconds']:.2f} "
                  f"| {r['tok_s']:.0f} |" for r in concurrency]
    return "\n".join(lines + [END]) + "\n"


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section between a tool's ``begin``/``end`` markers in ``path`` (append it if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def write_results(args, raw, summary, markdown, begin: str, end: str) -> None:
    """A model-bench tool's outputs: ``--json`` (raw and summary numbers) and ``--markdown`` (``markdown(name)``,
    ``name`` the model benchmarked: ``--model`` or the demo's random initial one, replacing the tool's section)."""
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": raw, "summary": summary}, indent=1))
    if args.markdown is not None:
        name = "the demo's random initial tiny Qwen3" if args.model is None else f"`{args.model}`"
        write_section(args.markdown, markdown(name), begin, end)


def command_line() -> str:
    """How this tool was run, for the section it writes."""
    return " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python", f"tools/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` / ``--markdown``, as ``publish`` takes them."""
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--markdown", type=Path, default=None, help="replace this tool's section in FILE")


def publish(section: str, raw, json_path: Optional[Path], markdown_path: Optional[Path], begin: str = BEGIN,
            end: str = END) -> None:
    """Print a tool's markdown section; write its raw numbers (``--json``) and its section (``--markdown``)."""
    print(section)
    if json_path:
        json_path.write_text(json.dumps(raw, indent=1))
    if markdown_path:
        write_section(markdown_path, section, begin, end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(SIZES), default="h256-L4", help="model for the tokens/s comparison")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="models for the weight-update latency")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2], help="sidecar tensor-parallel sizes")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 8], help="concurrent generation clients")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--baseline", default=None, metavar="PYTHONPATH",
                        help="also measure the concurrent load on the TP=1 sidecar of another checkout (e.g. the "
                             "previous server: --baseline /path/to/old/checkout), alternating with this one's")
    parser.add_argument("--rounds", type=int, default=3, help="concurrency measurements per case (median kept)")
    parser.add_argument("--push-compare", default=None, metavar="CHECKOUT",
                        help="only the collective push, this checkout against CHECKOUT (e.g. `git archive` of an "
                             "older commit), on --sizes at --tp")
    parser.add_argument("--push-worker", nargs=4, default=None, help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    max_len = args.prompt_len + args.max_tokens + 16
    if args.push_worker:
        url, model_dir, repeats, bucket_mb = args.push_worker
        push_worker(url, model_dir, int(repeats), int(bucket_mb))
        return 0
    if args.push_compare:
        with tempfile.TemporaryDirectory(prefix="opsd-bench-") as tmp:
            models = {name: make_model(Path(tmp), name, max_len) for name in args.sizes}
            rows = bench_push_compare(models, args.tp, args.repeats, max_len, args.push_compare)
        publish(push_markdown(rows), rows, args.json, args.markdown, PUSH_BEGIN, PUSH_END)
        return 0
    from megatron_opsd.rollout.client import SidecarClient

    gen, updates, concurrency = {}, {name: [] for name in args.sizes}, []
    with tempfile.TemporaryDirectory(prefix="opsd-bench-") as tmp:
        root = Path(tmp)
        models = {name: make_model(root, name, max_len) for name in dict.fromkeys([args.model, *args.sizes])}
        for tp in args.tp:  # one sidecar per (model, TP): its start-up is the slow part
            for name, model_dir in models.items():
                with sidecar(model_dir, max_len, tp) as proc, SidecarClient(proc.url, sync_timeout_s=300) as client:
                    if name == args.model and tp == 1:
                        gen = dict(bench_generation(client, model_dir, args.batch, args.prompt_len, args.max_tokens,
                                                    args.hf_threads), model=args.model)
                        print(json.dumps(gen, indent=1), flush=True)
                    if name == args.model and args.clients:
                        servers = {"this checkout": (client, ["/generate", "/v1/completions"])}
                        with contextlib.ExitStack() as stack:
                            if args.baseline and tp == 1:
                                old = stack.enter_context(sidecar(model_dir, max_len, 1, args.baseline))
                                servers[f"baseline ({args.baseline})"] = (
                                    stack.enter_context(SidecarClient(old.url)), ["/generate"])
                            concurrency += bench_concurrency(servers, args.clients, args.requests, args.max_tokens,
                                                             tp, args.rounds)
                    if name in updates:
                        updates[name] += bench_updates(client, model_dir, args.repeats, tp)
                print(name, tp, json.dumps(updates.get(name), indent=1), json.dumps(concurrency), flush=True)
    publish(to_markdown(gen, updates, concurrency), dict(generation=gen, updates=updates, concurrency=concurrency),
            args.json, args.markdown)
    return 0


if __name__ == "__main__":
    from megatron_opsd.lifecycle import install_shutdown_handlers

    install_shutdown_handlers()  # SIGTERM stops the sidecars/ranks this tool started
    raise SystemExit(main())
