"""RESEARCH PROTOTYPE (not part of the package, not used by the demo): can OPSDC visibly compress a tiny model?

Plain ``transformers`` + torch on one CPU thread, no megatron, no vLLM: this script only de-risks the demo's
recipe (task difficulty, model size, SFT and OPSD hyperparameters) before the real demo runs the same recipe
through the megatron trainer and the vLLM sidecar. Stages:

1. task splits + SFT mixture (``megatron_opsd.demo.task``), a BPE tokenizer trained on the task text and a
   random tiny Qwen3 (``models.tiny.make_tiny_hf_checkpoint``);
2. SFT on the mixture (loss on response tokens only);
3. OPSDC: rollouts from the student prompt (temperature 1), per-token reverse KL(student || teacher) over the
   full vocabulary, teacher = the same model (live weights, no grad) or the SFT weights (frozen) shown the
   concise-instruction prompt, mean over each rollout's tokens then over rollouts, Adam; optional filter of
   rollouts by correctness (all | correct | incorrect);
4. held-out accuracy and mean response tokens (greedy) before and after, for the student prompt and the
   concise prompt.

Usage (results as JSON under --out):
    .venv/bin/python tools/demo_feasibility.py --out /tmp/feas --filters all,correct,incorrect
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_opsd.demo import task  # noqa: E402
from megatron_opsd.models.tiny import make_tiny_hf_checkpoint  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/demo_feasibility")
    p.add_argument("--seed", type=int, default=0)
    # task
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--max-value", type=int, default=20)
    p.add_argument("--vocab", type=int, default=512)
    # model
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=384)
    # SFT
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--sft-batch", type=int, default=32)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-eval-every", type=int, default=0, help="greedy eval on 50 test problems (time not counted out)")
    p.add_argument("--reuse-sft", action="store_true", help="load <out>/sft if it exists")
    # OPSD
    p.add_argument("--filters", default="all", help="comma list of all | correct | incorrect")
    p.add_argument("--teacher", default="live", choices=["live", "frozen"])
    p.add_argument("--opsd-steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=16, help="prompts per OPSD step")
    p.add_argument("--n", type=int, default=1, help="rollouts per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--opsd-lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems per evaluation")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------- helpers

class Codec:
    """Prompt and response token ids, encoded separately (as rollouts are) with the chat template."""

    def __init__(self, tok):
        self.tok = tok
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id

    def prompt(self, messages) -> list[int]:
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)

    def response(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) + [self.eos]


def right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def response_logits(model, prompts: list[list[int]], responses: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each response token, as [B, T_resp_max, V], and the response mask [B, T_resp_max]."""
    ids, mask = right_pad([p + r for p, r in zip(prompts, responses)], pad)
    logits = model(input_ids=ids, attention_mask=mask).logits
    width = max(len(r) for r in responses)
    out = logits.new_zeros((len(prompts), width, logits.shape[-1]))
    rmask = torch.zeros((len(prompts), width))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        out[i, :len(r)] = logits[i, len(p) - 1:len(p) - 1 + len(r)]
        rmask[i, :len(r)] = 1.0
    return out, rmask


@torch.no_grad()
def generate(model, codec: Codec, prompts: list[list[int]], temperature: float, max_tokens: int,
             batch: int = 100) -> list[list[int]]:
    """Responses (token ids up to and including EOS, or max_tokens long), greedy when temperature == 0."""
    model.eval()
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), codec.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding for generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, eos_token_id=codec.eos,
                             pad_token_id=codec.pad, **kw)[:, width:]
        for row in gen.tolist():
            resp = []
            for t in row:
                resp.append(t)
                if t == codec.eos:
                    break
            out.append(resp)
    return out


def score(codec: Codec, examples: list[dict], responses: list[list[int]]) -> list[bool]:
    return [task.boxed_answer(codec.tok.decode(r, skip_special_tokens=True)) == ex["answer"]
            for ex, r in zip(examples, responses)]


@torch.no_grad()
def evaluate(model, codec: Codec, examples: list[dict], max_tokens: int, seed: int = 0) -> dict:
    """Accuracy, mean response tokens (EOS included) and "Wait" count per response, for the student prompt
    greedy and sampled at temperature 1 (seeded), and for the concise prompt greedy."""
    res = {}
    for name, build, temperature in (("student", task.student_messages, 0.0),
                                      ("student_t1", task.student_messages, 1.0),
                                      ("concise", task.concise_messages, 0.0)):
        torch.manual_seed(seed)
        resp = generate(model, codec, [codec.prompt(build(ex["problem"])) for ex in examples], temperature, max_tokens)
        ok = score(codec, examples, resp)
        waits = sum(codec.tok.decode(r).count("Wait") for r in resp) / len(resp)
        res[name] = {"accuracy": round(sum(ok) / len(ok), 4), "mean_tokens": round(sum(map(len, resp)) / len(resp), 2),
                     "waits": round(waits, 2), "truncated": sum(r[-1] != codec.eos for r in resp)}
    return res


# ----------------------------------------------------------------------------------------------- stages

def build(args, out: Path):
    cfg = task.TaskConfig(n_train=args.n_train, n_test=args.n_test, min_steps=args.min_steps,
                          max_steps=args.max_steps, max_value=args.max_value, seed=args.seed)
    train, test = task.generate_splits(cfg)
    mixture = task.build_sft_mixture(train, seed=args.seed)
    sft_dir = out / "sft"
    if args.reuse_sft and (sft_dir / "model.safetensors").exists():
        return train, test, mixture, sft_dir, True
    init_dir = make_tiny_hf_checkpoint(out / "init", "qwen3", seed=args.seed,
                                       tokenizer_texts=task.tokenizer_corpus(train, args.seed),
                                       tokenizer_vocab_size=args.vocab, hidden_size=args.hidden,
                                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                       head_dim=32, intermediate_size=args.ffn)
    return train, test, mixture, init_dir, False


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    return model, Codec(tok)


def sft(args, model, codec: Codec, mixture: list[dict], test: list[dict], log) -> float:
    data = [(codec.prompt(r["messages"][:-1]), codec.response(r["messages"][-1]["content"])) for r in mixture]
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, args.sft_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.sft_steps))))
    rng = random.Random(args.seed)
    model.train()
    t0, c0, c_eval = time.time(), time.process_time(), 0.0
    for step in range(args.sft_steps):
        batch = rng.sample(data, args.sft_batch)
        logits, rmask = response_logits(model, [b[0] for b in batch], [b[1] for b in batch], codec.pad)
        targets, _ = right_pad([b[1] for b in batch], codec.pad)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(rmask)
        loss = (nll * rmask).sum() / rmask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.sft_steps - 1:
            log(f"sft step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s cpu)")
        if args.sft_eval_every and (step + 1) % args.sft_eval_every == 0:
            ce = time.process_time()
            log(f"sft step {step + 1} eval(50) {json.dumps(evaluate(model, codec, test[:50], args.max_tokens))}")
            c_eval += time.process_time() - ce
            model.train()
    return time.process_time() - c0 - c_eval


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, rmask: torch.Tensor) -> torch.Tensor:
    """OPSDC's loss: mean over rollouts of the per-rollout mean of KL(p_S || p_T) over the full vocabulary."""
    logp_s = F.log_softmax(student_logits.float(), dim=-1)
    logp_t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    return ((kl * rmask).sum(-1) / rmask.sum(-1).clamp(min=1)).mean()


def opsd(args, model, codec: Codec, train: list[dict], test: list[dict], filt: str, log) -> dict:
    teacher = copy.deepcopy(model).eval() if args.teacher == "frozen" else model
    opt = torch.optim.Adam(model.parameters(), lr=args.opsd_lr)
    rng = random.Random(args.seed + 1)
    curve, t_train = [], 0.0  # CPU seconds of this process (one thread): rollouts + loss + update
    eval_set = test[:args.eval_n]
    for step in range(args.opsd_steps + 1):
        if step % args.eval_every == 0 or step == args.opsd_steps:
            ev = evaluate(model, codec, eval_set, args.max_tokens)
            curve.append({"step": step, **ev})
            log(f"[{filt}] step {step} eval {json.dumps(ev)} (train cpu {t_train:.0f}s)")
        if step == args.opsd_steps:
            break
        t0 = time.process_time()
        exs = [ex for ex in rng.sample(train, args.prompts) for _ in range(args.n)]
        s_prompts = [codec.prompt(task.student_messages(ex["problem"])) for ex in exs]
        t_prompts = [codec.prompt(task.concise_messages(ex["problem"])) for ex in exs]
        resp = generate(model, codec, s_prompts, args.temperature, args.max_tokens)
        ok = score(codec, exs, resp)
        keep = [i for i in range(len(exs)) if filt == "all" or ok[i] == (filt == "correct")]
        mean_len = sum(map(len, resp)) / len(resp)
        if not keep:
            log(f"[{filt}] step {step}: no rollout passes the filter; skipped")
            t_train += time.process_time() - t0
            continue
        model.train()
        s_logits, rmask = response_logits(model, [s_prompts[i] for i in keep], [resp[i] for i in keep], codec.pad)
        with torch.no_grad():
            t_logits, _ = response_logits(teacher, [t_prompts[i] for i in keep], [resp[i] for i in keep], codec.pad)
        loss = reverse_kl(s_logits, t_logits, rmask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t_train += time.process_time() - t0
        log(f"[{filt}] step {step} loss {loss.item():.4f} rollout_len {mean_len:.1f} "
            f"rollout_acc {sum(ok) / len(ok):.2f} kept {len(keep)}")
    return {"filter": filt, "curve": curve, "train_cpu_seconds": t_train}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = (out / "log.txt").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"args {json.dumps(vars(args))}")
    train, test, mixture, model_dir, trained = build(args, out)
    model, codec = load(model_dir)
    log(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M vocab {len(codec.tok)}")
    results = {"args": vars(args)}
    if not trained:
        results["sft_cpu_seconds"] = sft(args, model, codec, mixture, test, log)
        model.save_pretrained(str(out / "sft"))
        codec.tok.save_pretrained(str(out / "sft"))
    t0 = time.time()
    results["sft_eval"] = evaluate(model, codec, test, args.max_tokens)
    log(f"sft eval {json.dumps(results['sft_eval'])} ({time.time() - t0:.0f}s)")
    sft_state = copy.deepcopy(model.state_dict())
    results["opsd"] = []
    for filt in [f for f in args.filters.split(",") if f]:
        model.load_state_dict(sft_state)
        torch.manual_seed(args.seed + 2)
        results["opsd"].append(opsd(args, model, codec, train, test, filt, log))
        results["opsd"][-1]["final_eval_full_test"] = evaluate(model, codec, test, args.max_tokens)
        log(f"[{filt}] final {json.dumps(results['opsd'][-1]['final_eval_full_test'])}")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
