"""The recipe's configuration: the shipped BERT-large table, fp16 loss-scaling knobs mapped into
DeepSpeed's JSON, and the validation that keeps a loss scale from reaching 0."""

from __future__ import annotations

import json

import pytest

from bertscale.config import ConfigError, OptimizerSection, PhaseSection, accumulation_steps, load_config
from bertscale.engine import build_ds_config
from runs import REPO


def test_bert_large_config_is_the_published_recipe():
    cfg = load_config(REPO / "configs" / "bert_large.toml")
    p1, p2 = cfg.phases
    assert (p1.seq_len, p1.global_batch, p1.steps, p1.lr, p1.warmup) == (128, 65536, 7038, 6e-3, 0.2843)
    assert (p2.seq_len, p2.global_batch, p2.steps, p2.lr, p2.warmup, p2.decay_power) == (512, 32768, 1563, 4e-3,
                                                                                          0.128, 0.5)
    assert cfg.optimizer.name == "lamb" and cfg.model.preset == "large"
    assert not p2.carry_optimizer_state  # moments reset between phases, as the references do
    assert accumulation_steps(p1, 64) == 16 and accumulation_steps(p2, 64) == 32
    assert accumulation_steps(p1, 128) == 8  # another world size: accumulation follows
    with pytest.raises(ConfigError, match="not divisible"):
        accumulation_steps(p1, 48)


def _fp16_base(tmp_path, **extra) -> str:
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps({"fp16": {"enabled": True, **extra}, "zero_optimization": {"stage": 2}}))
    return str(path)


def test_fp16_loss_scaling_knobs_reach_deepspeed(tmp_path):
    opt = OptimizerSection(loss_scale_initial_power=12, loss_scale_window=200, loss_scale_hysteresis=3,
                           loss_scale_min=4.0)
    # a JSON that enables fp16 itself wins over the precision the launcher chose
    cfg = build_ds_config(_fp16_base(tmp_path), PhaseSection(global_batch=16, micro_batch=4), 2, opt, "cpu", "fp32")
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 200,
                           "hysteresis": 3, "min_loss_scale": 4.0}
    assert cfg["gradient_accumulation_steps"] == 2 and "optimizer" not in cfg  # our LAMB on every accelerator
    # train.precision = fp16 on the shipped ZeRO config: the knobs come from the run config
    shipped = build_ds_config(REPO / "ds_configs" / "zero2.json", PhaseSection(global_batch=16, micro_batch=4),
                              2, OptimizerSection(), "cuda", "fp16")
    assert shipped["fp16"]["enabled"] and shipped["fp16"]["initial_scale_power"] == 16
    assert shipped["fp16"]["min_loss_scale"] == 1.0 and "bf16" not in shipped and "optimizer" not in shipped


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_precision_section_follows_the_run_setting(precision):
    cfg = build_ds_config(REPO / "ds_configs" / "zero2.json", PhaseSection(global_batch=16, micro_batch=4), 2,
                          OptimizerSection(), "cpu", precision)
    assert "fp16" not in cfg
    assert cfg.get("bf16") == ({"enabled": True} if precision == "bf16" else None)
    assert cfg["zero_optimization"]["stage"] == 2


def test_loss_scaling_in_the_json_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="loss_scale_"):
        build_ds_config(_fp16_base(tmp_path, min_loss_scale=1), PhaseSection(global_batch=16, micro_batch=4), 2,
                        OptimizerSection(), "cpu", "fp32")


@pytest.mark.parametrize("override, fragment", [
    ("optimizer.loss_scale_min=0", "divides by zero"),
    ("optimizer.loss_scale_min=0.5", "loss_scale_min: 0.5 must be a finite number >= 1"),
    ("optimizer.loss_scale_initial_power=40", "initial_power"),
    ("optimizer.loss_scale_window=0", "loss_scale_window"),
    ("optimizer.max_trust_ratio=-1", "max_trust_ratio"),
    ("train.max_bad_steps=0", "max_bad_steps"),
])
def test_recipe_knobs_are_validated(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(REPO / "configs" / "bert_large.toml", [override])


def test_recipe_knobs_load_from_overrides():
    cfg = load_config(REPO / "configs" / "bert_large.toml",
                      ["phases.phase2.carry_optimizer_state=true", "train.replicate_data=true",
                       "optimizer.max_trust_ratio=10", "train.max_bad_steps=3"])
    assert cfg.phases[1].carry_optimizer_state and cfg.train.replicate_data
    assert cfg.optimizer.max_trust_ratio == 10.0 and cfg.train.max_bad_steps == 3


@pytest.mark.parametrize("table, key", [("bf16", "check_grad_overflow"), ("zero_optimization", "compute_grad_norm")])
def test_turning_off_the_overflow_check_is_refused(tmp_path, table, key):
    path = tmp_path / "unsafe.json"
    base = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    base[table][key] = False
    path.write_text(json.dumps(base))
    with pytest.raises(ConfigError, match="overflow check"):
        build_ds_config(path, PhaseSection(global_batch=16, micro_batch=4), 2, OptimizerSection(), "cpu", "fp32")
