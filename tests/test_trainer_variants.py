"""The OPSD trainer's step with the variant settings, on fixed rollouts (a test double for the sidecar client and
fixed rewards; everything else is the real trainer: chat prompts, teacher contexts, group filter, micro-batches,
megatron forward/backward, optimizer): DemoPSD (teacher.context=rollout, per-row teacher prompts holding another
correct rollout of the group, loss.target=demopsd) with progressive OPD (rollout.horizon_growth=linear), and
Purified OPSD (teacher.purified, three teacher forwards, loss.target=pmi). The first step's loss equals a
transformers + plain-torch reference computed from the prompts the trainer built. Config combinations the trainer
cannot run are rejected with the key and the fix.
"""
import json

import pytest
import torch

from megatron_opsd.config import ConfigError, load_config
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.training.loop import train_one_step
from tests._run_configs import write_run_config

PROBLEMS = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3")]
RESPONSE_LENGTHS = [[3, 5, 4], [6, 2, 4]]
CORRECT = [[True, False, True], [False, False, True]]  # group 1's only correct rollout has no other to show


def fixed_responses():
    g = torch.Generator().manual_seed(3)
    return [[torch.randint(20, 300, (n,), generator=g).tolist() for n in group] for group in RESPONSE_LENGTHS]


class FakeClient:
    """Sidecar test double: the fixed responses, stamped with the current weight version."""

    def __init__(self):
        self.version, self.max_tokens = 0, []

    def generate(self, prompts, *, sampling, max_tokens, **_):
        from megatron_opsd.rollout.client import Sample

        assert len(prompts) == len(RESPONSE_LENGTHS) and sampling.n == 3
        self.max_tokens.append(max_tokens)
        return [[Sample(r, [0.0] * len(r), "stop", self.version) for r in group] for group in fixed_responses()]

    def push_weights(self, model_chunks, version, restore=False):
        self.version = version


def recording_trainer(cfg, client=None):
    """The real OPSD trainer with the sidecar double and fixed rewards, recording each step's rollouts."""
    from megatron_opsd.training.opsd.trainer import OPSDTrainer

    class Recording(OPSDTrainer):
        def rollouts(self, timer):
            rollouts = super().rollouts(timer)
            self.recorded.append(rollouts)
            return rollouts

    torch.manual_seed(0)
    trainer = Recording(cfg)
    trainer.recorded, trainer.run.client = [], client or FakeClient()
    flat = [c for group in CORRECT for c in group]
    trainer.reward = lambda texts, examples: [float(c) for c in flat[:len(texts)]]
    return trainer


def trainer_worker(cfg, steps: int, client=None):
    trainer = recording_trainer(cfg, client)
    history = [train_one_step(trainer.run, trainer) for _ in range(steps)]
    if trainer.run.logger is not None:
        trainer.run.logger.close()
    return history, trainer.recorded


def make_config(tmp_path, model_dir, **sections):
    rows = [{"problem": problem, "answer": answer, "id": f"p{i}",
             "solution": f"Compute it: the answer is $\\boxed{{{answer}}}$."}
            for i, (problem, answer) in enumerate(PROBLEMS)]
    return load_config(str(write_run_config(tmp_path, rows, {
        "model": {"path": model_dir},
        "data": {"train_path": str(tmp_path / "train.jsonl"), "max_prompt_tokens": 256, "shuffle": False},
        "rollout": {"n": 3, "prompts_per_step": 2, "max_tokens": 8},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2},
        "logging": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }, sections)))


def hf_rows(model, prompt, response):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: len(prompt) + len(response) - 1]
    return logits.double().log_softmax(-1)


def test_demopsd_rollout_context_with_progressive_horizon(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_checkpoints["qwen3"]
    cfg = make_config(tmp_path, model_dir, teacher={"context": "rollout"},
                      loss={"target": "demopsd", "demopsd_alpha_max": 0.5, "demopsd_beta": 50.0},
                      rollout={"horizon_growth": "linear", "horizon_start": 2, "horizon_end": 4, "horizon_steps": 1})
    history, recorded = run_distributed(trainer_worker, 1, cfg.parallel, cfg, 2)[0]
    responses = fixed_responses()
    keep = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # (1, 2) is its group's only correct rollout: no demonstration
    for step, (metrics, horizon) in enumerate(zip(history, (2, 4))):
        assert metrics["rollout/horizon"] == horizon and metrics["rollout/no_teacher"] == 1.0
        assert metrics["tokens"] == sum(min(len(responses[i][j]), horizon) for i, j in keep), step
    teachers = recorded[0].teachers
    assert list(teachers) == ["rollout"] and teachers["rollout"][1][2] is None
    tok = AutoTokenizer.from_pretrained(model_dir)
    # each row's teacher shows the next *other* correct rollout of its group, cyclically
    for (i, j), (gi, gj) in {(0, 0): (0, 2), (0, 1): (0, 2), (0, 2): (0, 0), (1, 0): (1, 2), (1, 1): (1, 2)}.items():
        prompt = tok.decode(teachers["rollout"][i][j])
        assert PROBLEMS[i][0] in prompt and f"this problem:\n{tok.decode(responses[gi][gj])}\n\n" in prompt, (i, j)

    # step 1's loss: KL(student || barycenter(teacher, detached student)), token mean over the first 2 tokens
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    per_token, plain_tokens = [], []
    for i, j in keep:
        r = responses[i][j][:2]
        lp = hf_rows(model, recorded[0].student_prompts[i], r)
        lq = hf_rows(model, teachers["rollout"][i][j], r)
        m = (0.5 * lp.exp() + 0.5 * lq.exp()).log()
        jsd = 0.5 * (lp.exp() * (lp - m)).sum(-1) + 0.5 * (lq.exp() * (lq - m)).sum(-1)
        alpha = ((torch.sigmoid(50.0 * jsd) - 0.5) * 2 * 0.5)[:, None]
        target = ((1 - alpha) * lq + alpha * lp).log_softmax(-1)
        per_token.append((lp.exp() * (lp - target)).sum(-1))
        plain_tokens.append((lp.exp() * (lp - lq)).sum(-1))
    expected, plain = torch.cat(per_token).mean().item(), torch.cat(plain_tokens).mean().item()
    assert abs(plain - expected) > 0.01 * expected  # the barycenter is not the plain teacher (not vacuous)
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    print(f"DemoPSD trainer step: loss {history[0]['loss']:.6g}, reference {expected:.6g} (plain {plain:.6g})")


def test_purified_three_teacher_forwards_pmi_target(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_checkpoints["qwen3"]
    cfg = make_config(tmp_path, model_dir, teacher={"context": "reference", "purified": True},
                      loss={"target": "pmi", "divergence": "jsd", "beta": 0.5, "pmi_clip": 1.0, "pmi_beta": 0.5})
    history, recorded = run_distributed(trainer_worker, 1, cfg.parallel, cfg, 1)[0]
    rollouts, responses = recorded[0], fixed_responses()
    assert list(rollouts.teachers) == ["reference", "reference_only", "base"]
    assert history[0]["tokens"] == sum(map(sum, RESPONSE_LENGTHS))  # rollout.filter=all: every rollout
    tok = AutoTokenizer.from_pretrained(model_dir)
    for i, (problem, _) in enumerate(PROBLEMS):
        full, ref_only, base = (tok.decode(rollouts.teachers[c][i][0]) for c in rollouts.teachers)
        assert "Compute it" in full and problem in full
        assert "Compute it" in ref_only and problem not in ref_only
        assert rollouts.teachers["base"][i][0] == rollouts.student_prompts[i]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    per_token, plain_tokens = [], []
    for i, group in enumerate(responses):
        for j, r in enumerate(group):
            lp = hf_rows(model, rollouts.student_prompts[i], r)
            lt, lr, l0 = (hf_rows(model, rollouts.teachers[c][i][j], r) for c in rollouts.teachers)
            delta = lt - lr
            delta = 1.0 * torch.tanh((delta - delta.mean(-1, keepdim=True)) / 1.0)
            for q_log, out in (((l0 + delta / 0.5).log_softmax(-1), per_token), (lt, plain_tokens)):
                m = (0.5 * q_log.exp() + 0.5 * lp.exp()).log()
                out.append(0.5 * (q_log.exp() * (q_log - m)).sum(-1) + 0.5 * (lp.exp() * (lp - m)).sum(-1))
    expected, plain = torch.cat(per_token).mean().item(), torch.cat(plain_tokens).mean().item()
    assert abs(expected - plain) > 0.05 * expected  # the PMI target is not the plain teacher
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    print(f"Purified OPSD trainer step: loss {history[0]['loss']:.6g}, reference {expected:.6g} (plain {plain:.6g})")


@pytest.mark.parametrize("overrides, message", [
    (["teacher.purified=true"], "teacher.purified=true needs loss.target=pmi"),
    (["teacher.purified=true", "loss.target=pmi", "teacher.context=base"], "teacher.purified=true with "
                                                                           "teacher.context=base"),
    (["loss.coverage=sampled", "loss.divergence=pg", "loss.token_clip=0.1"], "unset loss.token_clip"),
    (["teacher.context=rollout", "rollout.n=1"], "set rollout.n >= 2"),
    (["teacher.purified=true", "loss.target=pmi", "loss.pmi_clip=0"], "loss.pmi_beta and loss.pmi_clip"),
    (["loss.demopsd_alpha_max=2"], "loss.demopsd_alpha_max must be in [0, 1]"),
    (["loss.coverage=topk"], "loss.top_k must be a positive integer"),
    (["loss.coverage=sampled", "loss.divergence=k1"], "loss.divergence=k1 trains on noise: the k1 estimator's "
                                                      "expected gradient is 0"),
    (["rollout.horizon=4", "rollout.horizon_growth=linear", "rollout.horizon_start=1", "rollout.horizon_end=2",
      "rollout.horizon_steps=3"], "not both"),
])
def test_rejected_combinations_name_key_and_fix(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_k1_loss_needs_the_opt_in():
    assert load_config(None, ["loss.coverage=sampled", "loss.divergence=k1",
                        "loss.allow_k1_loss=true"]).loss.divergence == "k1"


def spying_worker(cfg, steps: int):
    """``trainer_worker`` that also records, per step, the generation limit, each side's micro-batch length
    (student first, then the teacher contexts in order) and a checksum of the weights each teacher forward ran."""
    from megatron_opsd.training.opsd import step as opsd_step_module  # opsd_step and teacher_signal_source

    seen = {"lengths": [], "teacher_weights": []}
    build, teacher_rows = opsd_step_module.response_microbatches, opsd_step_module.response_rows

    def recording_build(*args, **kwargs):
        mbs = build(*args, **kwargs)
        seen["lengths"].append(mbs[0]["tokens"].shape[1])
        return mbs

    def recording_teacher_rows(chunk, mb):  # PP=1: one teacher forward per context and micro-batch
        seen["teacher_weights"].append(sum(p.detach().double().sum().item() for p in chunk.parameters()))
        return teacher_rows(chunk, mb)

    opsd_step_module.response_microbatches, opsd_step_module.response_rows = recording_build, recording_teacher_rows
    client = FakeClient()
    try:
        history, recorded = trainer_worker(cfg, steps, client)
    finally:
        opsd_step_module.response_microbatches, opsd_step_module.response_rows = build, teacher_rows
    return history, recorded, seen, client.max_tokens


@pytest.mark.slow
def test_truncated_opd_generates_and_forwards_only_to_the_horizon(tiny_checkpoints, tmp_path):
    """rollout.horizon with rollout.filter=all: the sidecar generates h tokens and both forwards end at prompt + h
    (padded to data.pad_to_multiple_of); with a correctness filter the rollouts are whole and cut for the forwards."""
    cfg = make_config(tmp_path, tiny_checkpoints["qwen3"], rollout={"horizon": 2},
                      data={"pad_to_multiple_of": 16})
    history, recorded, seen, max_tokens = run_distributed(spying_worker, 1, cfg.parallel, cfg, 1)[0]
    assert max_tokens == [2]
    assert history[0]["tokens"] == sum(min(n, 2) for g in RESPONSE_LENGTHS for n in g)
    student_len = max(len(p) for p in recorded[0].student_prompts) + 2
    teacher_len = max(len(p) for g in recorded[0].teachers["reference"] for p in g) + 2
    assert seen["lengths"] == [-(-student_len // 16) * 16, -(-teacher_len // 16) * 16]

    cfg = make_config(tmp_path / "correct", tiny_checkpoints["qwen3"], rollout={"horizon": 2, "filter": "correct"})
    history, _, seen, max_tokens = run_distributed(spying_worker, 1, cfg.parallel, cfg, 1)[0]
    assert max_tokens == [8]  # rollout.max_tokens: grading needs the whole response
    assert history[0]["tokens"] == sum(min(n, 2) for g, ok in zip(RESPONSE_LENGTHS, CORRECT)
                                       for n, c in zip(g, ok) if c)
    assert all(n % 8 == 0 for n in seen["lengths"])  # the default data.pad_to_multiple_of


@pytest.mark.slow
def test_purified_base_and_reference_only_stay_the_initial_model(tiny_checkpoints, tmp_path):
    """teacher.weights=live moves the full teacher with the student; the reference-only and base forwards of
    Purified OPSD must still be the initial model at step 2."""
    cfg = make_config(tmp_path, tiny_checkpoints["qwen3"], teacher={"purified": True, "weights": "live"},
                      loss={"target": "pmi", "divergence": "jsd"}, optim={"lr": 1e-2})
    _, _, seen, _ = run_distributed(spying_worker, 1, cfg.parallel, cfg, 2)[0]
    sums = seen["teacher_weights"]  # per step, per micro-batch: the full, reference-only and base forwards
    assert sums and len(sums) % 6 == 0
    step_1, step_2 = sums[:len(sums) // 2], sums[len(sums) // 2:]
    initial = step_1[0]
    assert all(w == initial for w in step_1)  # step 1: every forward runs the initial weights
    assert all(w == initial for i, w in enumerate(step_2) if i % 3)  # reference-only and base: still initial
    assert all(abs(w - initial) > 1e-3 for w in step_2[::3])  # the live teacher moved after one step at lr 1e-2


def test_template_with_rollout_variable_gets_a_demonstration(tiny_checkpoints, tmp_path):
    template = "{{ problem }}\nA correct solution: {{ rollout }}\nNow solve it yourself."
    cfg = make_config(tmp_path, tiny_checkpoints["qwen3"], teacher={"context": "template", "template": template})
    history, recorded, _, _ = run_distributed(spying_worker, 1, cfg.parallel, cfg, 1)[0]
    teachers = recorded[0].teachers["template"]
    assert teachers[1][2] is None and history[0]["rollout/no_teacher"] == 1.0  # the lone correct rollout
    from transformers import AutoTokenizer

    tok, responses = AutoTokenizer.from_pretrained(tiny_checkpoints["qwen3"]), fixed_responses()
    assert f"A correct solution: {tok.decode(responses[0][2])}" in tok.decode(teachers[0][0])  # next correct one


def recast_worker(cfg, steps: int):
    """``trainer_worker`` recording, in order, the teacher updates, the FP8 re-cast requests on the teacher replica
    and, at each teacher forward, the TE flag a stand-in TE linear sees.

    TE cannot run on CPU, so the linears' QKV projections of the teacher carry the attribute megatron's TE linears
    have (``is_first_microbatch``), and a forward pre-hook does what their forward does (read it: TE re-casts the
    FP8 weight when it is True; then set it False). Megatron's own ``set_is_first_microbatch`` runs, with
    ``config.fp8`` set for the duration of the call (it is a no-op without FP8; the forwards stay BF16/fp32)."""
    from megatron_opsd.models.weights import unwrap

    trainer = recording_trainer(cfg)
    events = []
    update = trainer.update_teacher

    def recording_update():
        update()
        events.append("update")

    trainer.update_teacher = recording_update
    for chunk in trainer.teacher:
        real = chunk.set_is_first_microbatch

        def recording_recast(real=real, chunk=chunk):
            config = unwrap(chunk).config
            config.fp8 = "hybrid"
            try:
                real()
            finally:
                config.fp8 = None
            events.append("recast")

        chunk.set_is_first_microbatch = recording_recast
        for layer in unwrap(chunk).decoder.layers:
            te_linear = layer.self_attention.linear_qkv
            te_linear.is_first_microbatch = True  # as TE linears start (megatron extensions/transformer_engine.py)

            def forward_like_te(module, args):
                if module is unwrap(chunk).decoder.layers[0].self_attention.linear_qkv:
                    events.append(("forward", module.is_first_microbatch))
                module.is_first_microbatch = False

            te_linear.register_forward_pre_hook(forward_like_te)
    history = [train_one_step(trainer.run, trainer) for _ in range(steps)]
    if trainer.run.logger is not None:
        trainer.run.logger.close()
    return history, events


def test_fp8_teacher_weights_recast_after_each_update(tiny_checkpoints, tmp_path):
    """Finding 1 of issue 31: at PP=1 the teacher forwards run outside megatron's schedules, the only place that
    tells TE to re-cast its cached FP8 weights, so an EMA / refreshed teacher scored with its step-1 FP8 weights.
    Now every step re-casts every teacher model before its first forward, after the previous step's update: per
    step, exactly the first teacher forward sees TE's flag set. The mechanism and its order only (no TE on CPU)."""
    cfg = make_config(tmp_path, tiny_checkpoints["qwen3"], teacher={"weights": "ema"})
    history, events = run_distributed(recast_worker, 1, cfg.parallel, cfg, 3)[0]
    assert len(history) == 3
    steps = [[]]
    for event in events:  # split at the updates: a step's events end with its teacher update
        steps[-1].append(event)
        if event == "update":
            steps.append([])
    assert steps.pop() == [] and len(steps) == 3
    for i, step in enumerate(steps):
        forwards = [e for e in step if isinstance(e, tuple)]
        assert len(forwards) >= 2 and forwards[0] == ("forward", True), (i, step)  # re-cast after the last update
        assert all(flag is False for _, flag in forwards[1:]), (i, step)  # the cached cast serves the rest
        assert step.count("recast") == 1 and step.index("recast") < step.index(forwards[0]), (i, step)
