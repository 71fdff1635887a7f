"""Config tree: YAML + overrides, type coercion from annotations, clear errors, save/reload round trip."""
import argparse
import dataclasses

import pytest
import yaml

from megatron_opsd.config import (
    ConfigError, OPSDConfig, add_config_arguments, apply_overrides, config_from_args, config_to_dict,
    load_config, save_config,
)
from megatron_opsd.parallel.distributed import ParallelConfig


def test_defaults_resolve_and_section_types():
    cfg = load_config(None, [])
    assert isinstance(cfg, OPSDConfig)
    assert type(cfg.parallel) is ParallelConfig  # the launcher's dataclass, not a copy
    assert (cfg.loss.coverage, cfg.loss.divergence) == ("full", "reverse_kl")
    assert cfg.model.make_vocab_size_divisible_by == 128
    assert cfg.logging.dir == "runs/opsd"  # runs/<name>
    assert load_config(None, ["logging.name=exp7"]).logging.dir == "runs/exp7"


def test_yaml_then_overrides_coerced_from_annotations(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": "/m", "enable_thinking": False},
        "loss": {"divergence": "jsd", "beta": 1},  # int in YAML for a float field
        "optim": {"lr": "1e-6"},  # PyYAML reads 1e-6 as a string
        "rollout": {"sidecar_urls": ["http://a:1"], "n": 4},
    }))
    cfg = load_config(str(path), [
        "--set", "loss.beta=0.25", "rollout.sidecar_urls=http://a:1,http://b:2", "rollout.horizon=64",
        "model.fp8=null", "model.enable_thinking=true", "parallel.tensor_model_parallel_size=2",
        "train.steps=7", "data.id_field=unique_id", "loss.token_clip=none", "rollout.filter=correct",
    ])
    assert cfg.model.path == "/m" and cfg.model.enable_thinking is True and cfg.model.fp8 is None
    assert cfg.loss.divergence == "jsd" and cfg.loss.beta == 0.25 and isinstance(cfg.loss.beta, float)
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.rollout.sidecar_urls == ["http://a:1", "http://b:2"] and cfg.rollout.n == 4
    assert cfg.rollout.horizon == 64 and cfg.rollout.filter == "correct"
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.train.steps == 7
    assert cfg.data.id_field == "unique_id" and cfg.loss.token_clip is None
    assert load_config(None, ["rollout.sidecar_urls=[x, y]"]).rollout.sidecar_urls == ["x", "y"]
    assert load_config(None, ["rollout.sidecar_urls="]).rollout.sidecar_urls == []


def test_save_and_reload_identical(tmp_path):
    cfg = load_config(None, ["loss.coverage=topk", "loss.top_k=20", "teacher.context=concise", "optim.lr=3e-7",
                             "rollout.horizon_growth=linear", "rollout.horizon_start=8", "rollout.horizon_end=64",
                             "rollout.horizon_steps=10", "data.system_prompt=Be brief.\nReally."])
    path = save_config(cfg, tmp_path / "sub" / "resolved.yaml")
    again = load_config(str(path), [])
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("override, message", [
    ("loss.divergence=foo",
     "loss.divergence: 'foo' is not one of ['reverse_kl', 'forward_kl', 'jsd', 'k1', 'k3', 'pg']"),
    ("loss.coverage=all", "loss.coverage: 'all' is not one of ['full', 'topk', 'sampled']"),
    ("loss.knd=jsd", "unknown config key 'loss.knd'; valid keys of loss: ['target', 'coverage', 'divergence',"),
    ("nosuch.key=1", "unknown config key 'nosuch.key'; valid keys at the top level: ['model',"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("train.steps=1.5", "train.steps: expected an integer, got '1.5'"),
    ("optim.use_distributed_optimizer=maybe", "optim.use_distributed_optimizer: expected true or false"),
    ("model.fp8=e5m2", "model.fp8: 'e5m2' is not one of ['hybrid', 'e4m3'] (or null)"),
    ("loss=jsd", "loss is a section"),
    ("loss.divergence", "is not of the form section.key=value"),
    ("teacher.context=template", "teacher.template must be set"),
    ("reward.kind=callable", "reward.callable must be set"),
    ("loss.coverage=topk", "loss.top_k must be a positive integer when loss.coverage=topk"),
    ("loss.divergence=pg", "loss.divergence=pg is a sampled-token estimator: set loss.coverage=sampled"),
    ("loss.coverage=sampled", "loss.coverage=sampled compares log-probs of the sampled token only: set "
                              "loss.divergence=pg"),
    ("loss.beta=1.5", "loss.beta must be in [0, 1]"),
    ("rollout.horizon_growth=linear", "needs rollout.horizon_start, rollout.horizon_end and rollout.horizon_steps"),
    ("loss.target=pmi", "loss.target=pmi needs teacher.purified=true"),
    ("rollout.max_kept=0", "rollout.max_kept must be null or >= 1"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_bad_yaml_values_name_the_full_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"rollout": {"temperature": "hot"}}))
    with pytest.raises(ConfigError, match=r"rollout.temperature: expected a number, got 'hot'"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"parallel": {"tensor_model_parallel_size": True}}))
    with pytest.raises(ConfigError, match=r"parallel.tensor_model_parallel_size: expected an integer, got True"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"loss": "jsd"}))
    with pytest.raises(ConfigError, match=r"loss: expected a mapping"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"loss": {"divergence": "jsd", "extra": 1}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.extra'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_overrides_and_cli_arguments():
    """``--set`` separators are skipped and a value keeps every ``=`` after the key's."""
    cfg = load_config(None, ["rollout.n=3", "--set", "model.path=/models/a=b", "--set=loss.beta=0.25"])
    assert (cfg.rollout.n, cfg.model.path, cfg.loss.beta) == (3, "/models/a=b", 0.25)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--set", "loss.divergence=jsd", "rollout.n=3", "--set", "loss.beta=0.1"])
    cfg = config_from_args(args)
    assert (cfg.loss.divergence, cfg.rollout.n, cfg.loss.beta) == ("jsd", 3, 0.1)


def test_apply_overrides_on_any_dataclass():
    @dataclasses.dataclass
    class Inner:
        ids: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)

    cfg = apply_overrides(Outer(), ["inner.ids=1,2,3"])
    assert cfg.inner.ids == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"inner.ids\[1\]: expected an integer, got 'b'"):
        apply_overrides(Outer(), ["inner.ids=1,b"])


@pytest.mark.parametrize("overrides, warns", [
    (["rollout.temperature=1.1"], True),  # loss.temperature stays 1.0
    (["rollout.temperature=1.1", "loss.temperature=1.1"], False),  # OPSD's tied setting
    (["rollout.temperature=1.1", "loss.coverage=topk", "loss.top_k=4"], True),
    (["rollout.temperature=1.1", "loss.coverage=sampled", "loss.divergence=pg"], False),  # log-probs of the samples
])
def test_temperature_mismatch_warning(overrides, warns):
    from megatron_opsd.config import distillation_warnings

    messages = distillation_warnings(load_config(None, overrides))
    assert bool(messages) == warns
    if warns:
        assert "loss.temperature=1.0 differs from rollout.temperature=1.1" in messages[0]


def test_published_defaults():
    """OPSDC's instruction as published; the large OPSDC configs refresh the teacher every 50 steps (OPSDC's M);
    the tiny pipeline's compression stage trains on correct rollouts only (Kim & Lee's filter) with the concise
    teacher its SFT stage taught (the demo's SFT never shows a reference solution)."""
    from pathlib import Path

    cfg = OPSDConfig()
    assert cfg.teacher.concise_instruction.startswith("Solve the following math problem concisely and correctly. "
                                                      "Be direct \u2014 avoid unnecessary elaboration")
    for path in sorted(Path("examples/configs").glob("*_opsdc.yaml")):
        opsdc = load_config(str(path))
        assert (opsdc.teacher.weights, opsdc.teacher.refresh_every) == ("refresh", 50), path
    stages = yaml.safe_load(Path("examples/pipeline_tiny.yaml").read_text())["stages"]
    (stage,) = [s for s in stages if s["kind"] == "opsd"]
    compression = load_config(stage["config"], stage["overrides"])
    assert (compression.teacher.context, compression.rollout.filter) == ("concise", "correct")


@pytest.mark.parametrize("old, replacement", [
    ("loss.kind=jsd", "loss.coverage=full loss.divergence=<kind>"),
    ("loss.kind=topk", "kind=topk -> loss.coverage=topk"),
    ("loss.kind=pg", "kind=k1|k3|pg -> loss.coverage=sampled loss.divergence=<kind>"),
    ("loss.topk_divergence=jsd", "replaced by loss.divergence (with loss.coverage=topk)"),
    ("teacher.pmi_beta=0.5", "moved: use loss.pmi_beta"),
    ("teacher.pmi_clip=3", "moved: use loss.pmi_clip"),
    ("teacher.pmi_center=teacher", "moved: use loss.pmi_center"),
])
def test_old_loss_keys_are_refused_naming_the_new_key(tmp_path, old, replacement):
    """The keys the loss split replaced (loss.kind, loss.topk_divergence, teacher.pmi_*) are unknown keys now:
    one line naming the replacement, from a YAML file as from an override."""
    key, value = old.split("=")
    section, name = key.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({section: {name: value}}))
    for path_arg, overrides in ((None, [old]), (str(path), [])):
        with pytest.raises(ConfigError) as err:
            load_config(path_arg, overrides)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"config key {key!r} was ") and replacement in message
