"""Multi-process workers for tests/test_grpo_step.py (top-level so run_distributed can pickle them)."""
import torch

from megatron_opsd.training.loop import train_one_step
from megatron_opsd.training.grpo.trainer import GRPOTrainer
from megatron_opsd.training.rollouts import StepRollouts
from megatron_opsd.parallel.control import broadcast_object

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
REWARDS = [[1.0, 0.0, 0.0], [0.2, 0.9, 0.5]]
LENGTHS = [[3, 5, 4], [6, 2, 4]]


def fixed_responses() -> list:
    g = torch.Generator().manual_seed(0)
    return [[torch.randint(20, 300, (n,), generator=g).tolist() for n in group] for group in LENGTHS]


def hf_logprobs(model_dir: str, prompts: list, responses: list) -> list:
    """log p(response tokens) under transformers' forward of the same checkpoint (the behaviour policy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, group in zip(prompts, responses):
            rows = []
            for resp in group:
                logits = model(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1: -1]
                rows.append(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(resp)[:, None])[:, 0].tolist())
            out.append(rows)
    return out


class SkipWeightPush:
    """Test double for the sidecar client: these tests have no sidecar (the e2e test covers the real push)."""

    def push_weights(self, model_chunks, version, restore=False):
        return None


class FixedRolloutsGRPO(GRPOTrainer):
    """Test double for the sidecar's rollouts: fixed token ids, rewards, and transformers' log-probs."""

    logprob_shift = 0.0  # added to the behaviour log-probs (a stale or mismatched sampler)

    def rollouts(self, timer):
        result = None
        if self.run.rank == 0:
            responses = fixed_responses()
            logprobs = [[[x + self.logprob_shift for x in row] for row in group]
                        for group in hf_logprobs(self.cfg.model.path, PROMPTS, responses)]
            correct = [[r > 0.5 for r in g] for g in REWARDS]
            result = StepRollouts(PROMPTS, responses, correct, REWARDS, logprobs)
        return broadcast_object(result)


def grpo_steps(cfg, steps: int, logprob_shift: float = 0.0) -> list:
    torch.manual_seed(0)
    trainer = FixedRolloutsGRPO(cfg)
    trainer.logprob_shift = logprob_shift
    trainer.run.client = SkipWeightPush()
    history = [train_one_step(trainer.run, trainer) for _ in range(steps)]
    trainer.run.logger and trainer.run.logger.close()
    return history


def grpo_steps_counting_rows(cfg, steps: int, up_front: bool) -> tuple:
    """``grpo_steps`` that also returns the most full-vocabulary row tensors (reference rows, recomputed
    log-probs' rows) alive at once, counted through weak references as each new one is made. ``up_front``: every
    micro-batch's rows are collected before the loss (what PP > 1 does, and what PP=1 did before issue 31 9d)."""
    import functools
    import weakref

    from megatron_opsd.training import response_rows as rows_module
    from megatron_opsd.training.grpo import step as grpo_step_module

    alive, peak = [], [0]

    def counted(make):
        def wrapper(*args, **kwargs):
            out = make(*args, **kwargs)
            alive.extend(weakref.ref(t) for t in (out if isinstance(out, list) else [out]))
            alive[:] = [ref for ref in alive if ref() is not None]
            peak[0] = max(peak[0], len(alive))
            return out
        return wrapper

    rows_module.response_rows = counted(rows_module.response_rows)
    rows_module.collect_response_rows = counted(rows_module.collect_response_rows)
    if up_front:
        grpo_step_module.rows_by_index = functools.partial(rows_module.rows_by_index, per_microbatch=False)
    return grpo_steps(cfg, steps), peak[0]
