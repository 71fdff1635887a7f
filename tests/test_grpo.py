"""GRPO pure functions against hand computations on a fixed rollout set (no model), and the rl config."""
import math

import pytest
import torch

from megatron_opsd.config import ConfigError
from megatron_opsd.training.grpo.algorithm import (clipped_policy_loss, group_advantages, informative_groups, k3_kl,
                                                   overlong_penalty, rollout_weights)
from megatron_opsd.training.grpo.config import load_rl_config

# Three prompts' groups: mixed, all correct, graded (a partial-credit reward).
REWARDS = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 1.0]]


def test_group_advantages_by_hand():
    adv = group_advantages(REWARDS, std_normalize=True, eps=1e-6)
    # Group 0: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025.
    assert adv[0] == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=2e-6)
    assert adv[1] == [0.0, 0.0, 0.0, 0.0]  # all equal: no signal
    # Group 2: mean 0.5, std sqrt((0.25 + 0 + 0.25) / 2) = 0.5.
    assert adv[2] == pytest.approx([-1.0, 0.0, 1.0], abs=5e-6)
    assert group_advantages(REWARDS, std_normalize=False) == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.5, 0.0, 0.5]]
    assert group_advantages([[3.0]]) == [[0.0]]  # a single rollout: A = 0, no NaN
    with pytest.raises(ValueError, match="group 0 has no rollouts"):
        group_advantages([[]])


def test_dynamic_sampling_drops_uniform_groups():
    assert informative_groups(REWARDS) == [True, False, True]
    assert informative_groups([[0.0, 0.0], [0.0, 1.0]]) == [False, True]


def test_dynamic_sampling_filters_on_accuracy_not_shaped_reward():
    from megatron_opsd.config import RLConfig
    from megatron_opsd.training.grpo.algorithm import step_rewards

    rl = RLConfig(dynamic_sampling=True, overlong_buffer=5, overlong_penalty=1.0)
    # group 0: all correct, one overlong (shaped rewards 1 and 0.4 differ); group 1: mixed; group 2: all wrong,
    # graded 0 and 0.5 (accuracy counts reward > 0.5 as correct)
    rewards, lengths = [[1.0, 1.0], [1.0, 0.0], [0.0, 0.5]], [[10, 18], [10, 10], [10, 10]]
    correct = [[r > 0.5 for r in g] for g in rewards]
    out = step_rewards(rewards, correct, lengths, rl, max_tokens=20)
    assert out.shaped[0] == pytest.approx([1.0, 0.4])
    assert out.used == [False, True, False]  # DAPO: 0 < accuracy < 1
    assert step_rewards(rewards, correct, lengths, RLConfig(), max_tokens=20).used == [True, True, True]


def test_overlong_penalty_by_hand():
    # max_tokens 20, L_cache 5: free up to 15 tokens, then linear to -1 at 20.
    got = [overlong_penalty(n, 20, 5, 1.0) for n in (10, 15, 16, 18, 20, 25)]
    assert got == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0, -1.0])
    assert overlong_penalty(19, 20, 5, 0.5) == pytest.approx(-0.4)
    assert overlong_penalty(20, 20, 0, 1.0) == 0.0  # disabled


def _tokens(ratios, old=(-1.0, -2.0, -0.5, -3.0, -1.5)):
    old = torch.tensor(old, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(ratios, dtype=torch.float64))).requires_grad_(True)
    return logp, old


def test_clipped_loss_and_grad_by_hand():
    logp, old = _tokens([1.5, 0.5, 0.5, 1.5, 1.1])
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0, 0.5], dtype=torch.float64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    loss, clipped = clipped_policy_loss(logp, old, adv, w, eps_low=0.2, eps_high=0.28)
    # Per token -min(ratio A, clip(ratio, 0.8, 1.28) A):
    #   1.5,+1 -> -1.28 (clipped) | 0.5,+1 -> -0.5 | 0.5,-2 -> +1.6 (clipped) | 1.5,-2 -> +3.0 | 1.1,0.5 -> -0.55
    expected = 0.1 * -1.28 + 0.2 * -0.5 + 0.3 * 1.6 + 0.15 * 3.0 + 0.25 * -0.55
    assert loss.item() == pytest.approx(expected, abs=1e-12) and expected == pytest.approx(0.5645)
    assert clipped.tolist() == [True, False, True, False, False]
    loss.backward()
    # d/dlogp of -ratio*A is -ratio*A where unclipped, 0 where the clip is active.
    assert logp.grad.tolist() == pytest.approx([0.0, 0.2 * -0.5, 0.0, 0.15 * 3.0, 0.25 * -0.55], abs=1e-12)


def test_clip_higher_vs_symmetric():
    logp, old = _tokens([1.5, 1.25, 0.7, 1.0, 1.0])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    w = torch.ones(5, dtype=torch.float64)
    sym, sym_clip = clipped_policy_loss(logp, old, adv, w, eps_low=0.2, eps_high=0.2)
    high, high_clip = clipped_policy_loss(logp, old, adv, w, eps_low=0.2, eps_high=0.28)
    # Symmetric: 1.25 is clipped to 1.2 (A > 0); clip-higher lets it through (1.25 < 1.28).
    assert sym.item() == pytest.approx(-1.2 - 1.2 + 0.8 - 1.0 + 1.0)
    assert high.item() == pytest.approx(-1.28 - 1.25 + 0.8 - 1.0 + 1.0)
    assert sym_clip.tolist() == [True, True, True, False, False]
    assert high_clip.tolist() == [True, False, True, False, False]
    with pytest.raises(ValueError, match="must have one shape"):
        clipped_policy_loss(logp, old, adv[:4], w, eps_low=0.2, eps_high=0.2)


def test_on_policy_gradient_is_policy_gradient():
    """ratio = 1 (on-policy): the clip is inactive and the gradient is -w * A (REINFORCE with the baseline)."""
    old = torch.tensor([-1.0, -2.0, -0.3], dtype=torch.float64)
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([0.7, -1.3, 0.0], dtype=torch.float64)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    loss, clipped = clipped_policy_loss(logp, old, adv, w, eps_low=0.2, eps_high=0.28)
    loss.backward()
    assert loss.item() == pytest.approx(-(0.5 * 0.7 - 0.25 * 1.3))
    assert not clipped.any()
    assert logp.grad.tolist() == pytest.approx((-w * adv).tolist())


def test_k3_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.2])).requires_grad_(True)
    ref = torch.log(torch.tensor([0.25, 0.2]))
    kl = k3_kl(logp, ref)
    # r = log(0.25 / 0.5): exp(r) - 1 - r = 0.5 - 1 + log 2; equal policies: 0.
    assert kl.tolist() == pytest.approx([0.5 - 1 + math.log(2), 0.0], abs=1e-6)
    kl.sum().backward()
    assert logp.grad.tolist() == pytest.approx([1 - 0.5, 0.0], abs=1e-6)  # d/dlogp = 1 - exp(r)


def test_rollout_weights_token_vs_sequence():
    tok = rollout_weights([2, 3], token_level=True)
    seq = rollout_weights([2, 3], token_level=False)
    assert [t.tolist() for t in tok] == [pytest.approx([0.2] * 2), pytest.approx([0.2] * 3)]
    assert [t.tolist() for t in seq] == [pytest.approx([0.25] * 2), pytest.approx([1 / 6] * 3)]


def test_rl_config_loads_and_validates(tmp_path):
    cfg = load_rl_config("examples/grpo_tiny.yaml", ["rl.kl_coef=0.05", "rl.clip_eps_high=0.3"])
    assert cfg.rl.kl_coef == 0.05 and cfg.rl.clip_eps_high == 0.3 and cfg.rl.clip_eps_low == 0.2
    assert cfg.rollout.n >= 2
    with pytest.raises(ConfigError, match="rl.kl_estimator"):
        load_rl_config("examples/grpo_tiny.yaml", ["rl.kl_estimator=k9"])
    with pytest.raises(ConfigError, match=r"rl.kl_estimator=k1 trains on noise.*rl.allow_k1_kl=true"):
        load_rl_config("examples/grpo_tiny.yaml", ["rl.kl_coef=0.1", "rl.kl_estimator=k1"])
    assert load_rl_config("examples/grpo_tiny.yaml", ["rl.kl_coef=0.1", "rl.kl_estimator=k1",
                                                      "rl.allow_k1_kl=true"]).rl.allow_k1_kl
    with pytest.raises(ConfigError, match="rl.overlong_buffer"):
        load_rl_config("examples/grpo_tiny.yaml", ["rl.overlong_buffer=100000"])
    with pytest.raises(ConfigError, match="rollout.n=1"):
        load_rl_config("examples/grpo_tiny.yaml", ["rollout.n=1"])
    with pytest.raises(ConfigError, match="rollout.filter"):
        load_rl_config("examples/grpo_tiny.yaml", ["rollout.filter=correct"])
    with pytest.raises(ConfigError, match="rl.nonsense"):
        load_rl_config("examples/grpo_tiny.yaml", ["rl.nonsense=1"])


def test_rl_config_has_its_own_reference_and_no_teacher_or_loss():
    """GRPO's reference model is ``rl.reference`` (auto: frozen iff rl.kl_coef > 0); the OPSD-only sections are
    not part of a GRPO config, and the shared sections are still validated."""
    from megatron_opsd.training.grpo.config import reference_model

    assert reference_model(load_rl_config("examples/grpo_tiny.yaml", ["rl.kl_coef=0.1"]).rl) == "frozen"
    assert reference_model(load_rl_config("examples/grpo_tiny.yaml").rl) == "none"
    assert reference_model(load_rl_config("examples/grpo_tiny.yaml", ["rl.reference=frozen"]).rl) == "frozen"
    with pytest.raises(ConfigError, match="rl.kl_coef=0.1 needs a reference model: set rl.reference=frozen"):
        load_rl_config("examples/grpo_tiny.yaml", ["rl.kl_coef=0.1", "rl.reference=none"])
    with pytest.raises(ConfigError, match="model.lora with a reference model"):
        load_rl_config("examples/grpo_tiny.yaml", ["rl.kl_coef=0.1", "model.lora.rank=4"])
    for section in ("teacher.context=base", "loss.kind=jsd"):
        with pytest.raises(ConfigError, match=f"unknown config key {section.split('=')[0]!r}"):
            load_rl_config("examples/grpo_tiny.yaml", [section])
    with pytest.raises(ConfigError, match="rollout.max_tokens must be >= 1"):  # config.validate_config's check
        load_rl_config("examples/grpo_tiny.yaml", ["rollout.max_tokens=0"])
    assert load_rl_config("examples/grpo_tiny.yaml", ["logging.dir=null", "logging.name=g"]).logging.dir == "runs/g"


def test_rl_cli_refuses_bad_values_before_starting(capsys):
    from megatron_opsd.cli import main

    # a config error is one line on stderr and exit status 2 (megatron_opsd.errors), before any rank starts
    assert main(["rl", "--config", "examples/grpo_tiny.yaml", "--set", "rl.clip_eps_low=1.5", "--nproc", "2"]) == 2
    assert "megatron-opsd: error: rl.clip_eps_low must be < 1" in capsys.readouterr().err
    assert main(["rl", "--config", "examples/grpo_tiny.yaml", "rl.kl_coef=-1"]) == 2
    assert "megatron-opsd: error: rl.kl_coef must be >= 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="rl.kl_coef must be >= 0"):  # the traceback with --debug
        main(["rl", "--config", "examples/grpo_tiny.yaml", "rl.kl_coef=-1", "--debug"])
    with pytest.raises(SystemExit):
        main(["rl", "--help"])
    assert "GRPO with verifiable rewards" in capsys.readouterr().out
