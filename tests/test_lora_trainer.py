"""The OPSD trainer with LoRA (Purified OPSD, live teacher): the real trainer step on test_trainer_variants' fixed
rollouts, no teacher replica; step 2's loss equals a PEFT reference in which the full teacher and the student use
the adapters trained in step 1 and the reference-only and base forwards use the frozen base."""
import pytest
import torch

from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.training.loop import train_one_step
from tests.test_trainer_variants import fixed_responses, hf_rows, make_config, recording_trainer


def lora_trainer_worker(cfg, adapter_dir: str):
    from megatron_opsd.models.lora import LoRASettings
    from megatron_opsd.models.lora_peft import save_peft_adapter

    trainer = recording_trainer(cfg)
    history = [train_one_step(trainer.run, trainer)]
    save_peft_adapter(trainer.run.student, adapter_dir, LoRASettings.from_config(cfg.model.lora), cfg.model.path)
    history.append(train_one_step(trainer.run, trainer))
    if trainer.run.logger is not None:
        trainer.run.logger.close()
    return history, trainer.recorded, trainer.teacher is None


def _pmi_jsd(lp, lt, lr, l0):
    delta = lt - lr
    delta = 1.0 * torch.tanh((delta - delta.mean(-1, keepdim=True)) / 1.0)
    q_log = (l0 + delta / 0.5).log_softmax(-1)
    m = (0.5 * q_log.exp() + 0.5 * lp.exp()).log()
    return 0.5 * (q_log.exp() * (q_log - m)).sum(-1) + 0.5 * (lp.exp() * (lp - m)).sum(-1)


@pytest.mark.slow
def test_lora_trainer_purified_live_teacher(tiny_checkpoints, tmp_path):
    """The LoRA trainer with Purified OPSD and a live teacher: the step's loss equals a PEFT reference in which the
    reference-only and base forwards run without adapters; the only check that adapters are switched per forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_checkpoints["qwen3"]
    cfg = make_config(tmp_path, model_dir, teacher={"context": "reference", "purified": True, "weights": "live"},
                      loss={"target": "pmi", "divergence": "jsd", "beta": 0.5, "pmi_clip": 1.0, "pmi_beta": 0.5},
                      optim={"lr": 3e-2},
                      model={"path": model_dir, "lora": {"rank": 4, "alpha": 8.0, "sync": "merged"}})  # FakeClient
    history, recorded, no_replica = run_distributed(lora_trainer_worker, 1, cfg.parallel, cfg,
                                                    str(tmp_path / "adapter"))[0]
    assert no_replica
    rollouts = recorded[1]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(tmp_path / "adapter")).eval()
    expected, all_adapted = [], []
    for i, group in enumerate(fixed_responses()):
        for j, r in enumerate(group):
            lp, lt, lr_on = (hf_rows(model, p, r) for p in (rollouts.student_prompts[i],
                                                             rollouts.teachers["reference"][i][j],
                                                             rollouts.teachers["reference_only"][i][j]))
            with model.disable_adapter():
                lr, l0 = (hf_rows(model, rollouts.teachers[c][i][j], r) for c in ("reference_only", "base"))
            l0_on = hf_rows(model, rollouts.teachers["base"][i][j], r)
            expected.append(_pmi_jsd(lp, lt, lr, l0))
            all_adapted.append(_pmi_jsd(lp, lt, lr_on, l0_on))
    expected, all_adapted = torch.cat(expected).mean().item(), torch.cat(all_adapted).mean().item()
    assert abs(expected - all_adapted) > 1e-3 * expected  # the adapters matter for the reference/base forwards
    assert history[1]["loss"] == pytest.approx(expected, rel=1e-4)
