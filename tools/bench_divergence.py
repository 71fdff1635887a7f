"""Benchmark: vocab-parallel chunked reverse KL vs the naive way (gather vocab, log_softmax both, autograd).

Each configuration runs in freshly spawned processes (run_distributed, gloo; TP=1 is one process) so peak
memory is not polluted by earlier runs. Peak extra memory = VmHWM - VmRSS measured around one forward+backward
after resetting the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``): it sees every torch CPU
allocation (tracemalloc does not), and it includes the [tokens, V/TP] gradient that both methods must produce.
The memory run uses ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the OS (RSS tracks live
torch memory); a small warm-up step runs first so lazy initialisation is not counted. Time comes from a
separate run with glibc's default allocator: best of ``--repeats`` forward+backward passes. TP>1 reports the max over ranks.

    python tools/bench_divergence.py --tp 1                  # V=151,936, 4,096 tokens (naive needs ~12 GiB)
    python tools/bench_divergence.py --tp 2 --tokens 2048    # naive: ~8 GiB on each rank (4,096: ~17 GiB each)
    python tools/bench_divergence.py --quick                 # 1,024 tokens, TP=1 and 2
The table in docs/benchmarks.md was made with ``--chunk 128``.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _naive_loss(student, teacher, temperature):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    full_s = gather_from_tensor_model_parallel_region(student)  # autograd-aware all-gather over the TP group
    full_t = gather_from_tensor_model_parallel_region(teacher)
    logp = torch.log_softmax(full_s.float() / temperature, dim=-1)
    logq = torch.log_softmax(full_t.float() / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def bench_worker(method: str, tokens: int, vocab: int, dtype: str, chunk: int, repeats: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_opsd.losses import vocab_parallel_divergence

    group = parallel_state.get_tensor_model_parallel_group()
    width = vocab // dist.get_world_size(group)
    gen = torch.Generator().manual_seed(dist.get_rank(group))
    student = torch.empty(tokens, width, dtype=getattr(torch, dtype)).normal_(generator=gen).requires_grad_(True)
    teacher = torch.empty(tokens, width, dtype=getattr(torch, dtype)).normal_(generator=gen)

    def step():
        student.grad = None
        if method == "naive":
            loss = _naive_loss(student, teacher, 1.0)
        else:
            loss = vocab_parallel_divergence(student, teacher, group=group, chunk_tokens=chunk)[0]
        loss.backward()
        return loss.item()

    small_s = student[:8].detach().clone().requires_grad_(True)  # warm-up: lazy inits must not count as memory
    if method == "naive":
        _naive_loss(small_s, teacher[:8], 1.0).backward()
    else:
        vocab_parallel_divergence(small_s, teacher[:8], group=group, chunk_tokens=chunk)[0].backward()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak-RSS high-water mark
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = step()
    times = [time.perf_counter() - start]
    extra_mib = (_status_kib("VmHWM") - base) / 1024
    for _ in range(repeats - 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(loss=loss, extra_mib=extra_mib, seconds=min(times))


def _spawn(method, tp, args, repeats, mmap_threshold):
    if mmap_threshold:  # read by glibc at process start, so it must be in the environment spawn inherits
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        return run_distributed(bench_worker, tp, ParallelConfig(tensor_model_parallel_size=tp), method, args.tokens,
                               args.vocab, args.dtype, args.chunk, repeats,
                               env={"OPSD_THREADS_PER_RANK": str(max(1, args.threads // tp))})
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)


def run(method, tp, args):
    """Memory from a run with a fixed mmap threshold; time from a run with glibc's default allocator."""
    memory = _spawn(method, tp, args, 1, mmap_threshold=True)
    timing = _spawn(method, tp, args, args.repeats, mmap_threshold=False)
    return dict(loss=memory[0]["loss"], extra_mib=max(r["extra_mib"] for r in memory),
                seconds=max(r["seconds"] for r in timing))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,024 tokens instead of 4,096")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in total, split over TP ranks")
    args = parser.parse_args()
    args.tokens = args.tokens or (1024 if args.quick else 4096)
    print(f"V={args.vocab} tokens={args.tokens} dtype={args.dtype} chunk={args.chunk} threads={args.threads}")
    print("| TP | method | peak extra MiB | fwd+bwd s | loss |\n|---|---|---|---|---|")
    rows = []
    for tp in args.tp:
        ours, naive = run("ours", tp, args), run("naive", tp, args)
        grad_mib = args.tokens * args.vocab // tp * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
        bound_mib = args.chunk * args.vocab // tp * 4 / 2**20
        for name, r in (("ours", ours), ("naive", naive)):
            print(f"| {tp} | {name} | {r['extra_mib']:.0f} | {r['seconds']:.2f} | {r['loss']:.6f} |")
        rows.append((tp, naive["extra_mib"] / ours["extra_mib"], naive["seconds"] / ours["seconds"],
                     (ours["extra_mib"] - grad_mib) / bound_mib))
    print("\n| TP | memory naive/ours | time naive/ours | ours (extra - grad) / (chunk x V/TP x 4 B) |")
    print("|---|---|---|---|")
    for tp, mem, sec, const in rows:
        print(f"| {tp} | {mem:.1f}x | {sec:.2f}x | {const:.1f} |")


if __name__ == "__main__":
    from megatron_opsd.lifecycle import install_shutdown_handlers

    install_shutdown_handlers()  # SIGTERM stops the sidecars/ranks this tool started
    main()
