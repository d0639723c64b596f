"""The run configuration: TOML in, typed tree out, overrides, and errors that say how to fix each problem."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bertscale.config import (ConfigError, PhaseSection, RunConfig, accumulation_steps, apply_overrides, describe,
                              from_dict, load_config, max_predictions, resolve_paths, validate)

REPO = Path(__file__).resolve().parent.parent

GOOD = """
[run]
name = "t"
out_dir = "out/run"
seed = 7

[model]
preset = "tiny"
tokenizer = "data/tok"
num_hidden_layers = 1

[distributed]
deepspeed_config = "ds_configs/zero2.json"
accelerator = "cpu"
num_gpus = 2

[optimizer]
name = "lamb"
betas = [0.9, 0.98]
weight_decay = 0      # an int where a float is declared is fine

[train]
log_interval = 5
keep_last = 3

[[phases]]
name = "phase1"
seq_len = 128
data = "data/d128"
global_batch = 64
micro_batch = 8
steps = 100
lr = 1e-3

[[phases]]
name = "phase2"
seq_len = 512
data = "data/d512"
global_batch = 32
micro_batch = 4
steps = 20
lr = 5e-4
warmup = 0.2
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    return str(info.value)


def test_load_good_config(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert isinstance(cfg, RunConfig)
    assert cfg.run.name == "t" and cfg.run.seed == 7 and cfg.run.out_dir == "out/run"
    assert cfg.model.preset == "tiny" and cfg.model.num_hidden_layers == 1 and cfg.model.hidden_size is None
    assert cfg.distributed.num_gpus == 2 and cfg.distributed.master_port is None  # default kept: picked per run
    assert cfg.optimizer.betas == [0.9, 0.98]
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.train.log_interval == 5 and cfg.train.keep_last == 3 and cfg.train.save_interval == 1000
    assert [p.name for p in cfg.phases] == ["phase1", "phase2"]
    p2 = cfg.phases[1]
    assert (p2.seq_len, p2.global_batch, p2.micro_batch, p2.steps, p2.lr, p2.warmup) == (512, 32, 4, 20, 5e-4, 0.2)
    assert cfg.phases[0].warmup == PhaseSection.warmup
    assert cfg.phase("phase2") == (1, p2)
    with pytest.raises(ConfigError, match="no phase named 'phase3'"):
        cfg.phase("phase3")


def test_missing_file_and_unparsable_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    msg = error_of(tmp_path, "[run\nname = 1\n")
    assert "cannot parse" in msg and "run.toml" in msg


def test_unknown_key_suggests_the_closest_one(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("lr = 1e-3", "lrr = 1e-3"))
    assert "phases[0].lrr: unknown key (did you mean 'lr'?)" in msg


def test_unknown_key_without_close_match_lists_known_keys(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("lr = 1e-3", "lerning_rate = 1e-3"))
    assert "phases[0].lerning_rate: unknown key" in msg
    assert "did you mean" not in msg.split("lerning_rate")[1].splitlines()[0]
    assert "known: name, seq_len, data" in msg


def test_section_typo_suggests_the_section(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("[train]", "[trian]"))
    assert "trian: unknown section (did you mean 'train'?)" in msg


def test_key_typo_in_a_section(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("log_interval = 5", "log_intervall = 5"))
    assert "train.log_intervall: unknown key (did you mean 'log_interval'?)" in msg


def test_type_errors_are_reported_by_from_dict():
    with pytest.raises(ConfigError) as info:
        from_dict({"train": {"log_interval": "ten"}, "distributed": {"no_ssh": 1},
                   "optimizer": {"betas": 0.9}, "phases": [{"steps": 2.5, "lr": "high"}]})
    msg = str(info.value)
    assert "train.log_interval: expected an integer, got 'ten'" in msg
    assert "distributed.no_ssh: expected true or false, got 1" in msg
    assert "optimizer.betas: expected a list, got 0.9" in msg
    assert "phases[0].steps: expected an integer, got 2.5" in msg
    assert "phases[0].lr: expected float, got 'high'" in msg


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="train.keep_last: expected an integer, got True"):
        from_dict({"train": {"keep_last": True}})


def test_type_error_in_file_gives_config_error(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("steps = 100", 'steps = "100"'))
    assert "phases[0].steps: expected an integer, got '100'" in msg


def test_overrides_sections_and_phases(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), [
        "train.log_interval=2", "phases.0.steps=5", "phases.phase2.lr=1e-4",
        "distributed.master_addr=10.0.0.1", "run.name='quoted'", "optimizer.betas=[0.8, 0.9]",
        "distributed.no_ssh=false"])
    assert cfg.train.log_interval == 2
    assert cfg.phases[0].steps == 5 and cfg.phases[1].steps == 20
    assert cfg.phases[1].lr == 1e-4 and cfg.phases[0].lr == 1e-3
    assert cfg.distributed.master_addr == "10.0.0.1"  # a string field keeps the text, not a TOML float
    assert cfg.run.name == "quoted"
    assert cfg.optimizer.betas == [0.8, 0.9]


def test_override_later_wins_and_input_is_not_mutated():
    data = {"train": {"log_interval": 10}, "phases": [{"name": "a", "steps": 3}]}
    out = apply_overrides(data, ["train.log_interval=1", "train.log_interval=4", "phases.a.steps=9"])
    assert out["train"]["log_interval"] == 4 and out["phases"][0]["steps"] == 9
    assert data == {"train": {"log_interval": 10}, "phases": [{"name": "a", "steps": 3}]}


def test_override_to_a_new_section_key():
    out = apply_overrides({}, ["train.eval_batches=0"])
    assert out == {"train": {"eval_batches": 0}}


def test_phase_selected_by_default_name():
    # a phase with no name is called "phase1" (the field default)
    out = apply_overrides({"phases": [{"steps": 3}]}, ["phases.phase1.steps=4"])
    assert out["phases"][0]["steps"] == 4


@pytest.mark.parametrize("item, fragment", [
    ("phases.phase9.lr=1", "no phase 'phase9'; phases are ['phase1', 'phase2']"),
    ("phases.2.lr=1", "no phase '2'"),
    ("phases.lr=1", "phase keys look like phases.0.lr or phases.phase1.lr"),
    ("train.log_interval", "expected KEY=VALUE"),
    ("train=5", "keys look like SECTION.FIELD"),
    ("train.a.b=5", "keys look like SECTION.FIELD"),
])
def test_bad_overrides(tmp_path, item, fragment):
    assert fragment in error_of(tmp_path, GOOD, [item])


def test_override_of_unknown_field_is_caught_like_a_file_typo(tmp_path):
    msg = error_of(tmp_path, GOOD, ["phases.0.lrr=1"])
    assert "phases[0].lrr: unknown key (did you mean 'lr'?)" in msg


def test_override_on_a_non_table():
    with pytest.raises(ConfigError, match="train is not a table"):
        apply_overrides({"train": 5}, ["train.log_interval=1"])


def test_accumulation_steps_exact():
    phase = PhaseSection(name="p", global_batch=256, micro_batch=8)
    assert accumulation_steps(phase, 4) == 8
    assert accumulation_steps(phase, 32) == 1
    assert accumulation_steps(PhaseSection(global_batch=24, micro_batch=3), 2) == 4


def test_accumulation_steps_not_divisible_names_phase_and_a_multiple():
    with pytest.raises(ConfigError) as info:
        accumulation_steps(PhaseSection(name="phase2", global_batch=100, micro_batch=8), 4)
    msg = str(info.value)
    assert "phase 'phase2'" in msg
    assert "global_batch 100" in msg and "micro_batch 8 x world size 4 = 32" in msg
    assert "multiple of 32 (e.g. 96)" in msg


def test_accumulation_steps_global_smaller_than_one_step_suggests_one_step():
    with pytest.raises(ConfigError, match=r"multiple of 32 \(e.g. 32\)"):
        accumulation_steps(PhaseSection(name="p", global_batch=20, micro_batch=8), 4)


def test_validate_collects_every_problem():
    cfg = RunConfig()
    cfg.model.preset = "bsae"
    cfg.distributed.accelerator = "tpu"
    cfg.optimizer.betas = [0.9]
    cfg.train.keep_last = 0
    cfg.phases = [PhaseSection(name="a", data="d", global_batch=10, micro_batch=3, lr=0.0, warmup=1.5),
                  PhaseSection(name="a", data="", seq_len=4)]
    problems = validate(cfg)
    joined = "\n".join(problems)
    assert "model.preset: 'bsae' is not a preset (did you mean 'base'?)" in joined
    assert "model.tokenizer: set it to the directory" in joined
    assert "distributed.accelerator: 'tpu' must be auto, cpu or cuda" in joined
    assert "optimizer.betas" in joined
    assert "train.keep_last: 0 must be a finite number >= 1" in joined
    assert "phases: names must be unique" in joined
    assert "phases[0] (a).global_batch: 10 is not a multiple of micro_batch 3" in joined
    assert "phases[0] (a).lr: 0.0 must be a finite number > 0" in joined
    assert "phases[0] (a).warmup" in joined
    assert "phases[1] (a).data: set it to the directory written by `bertscale shards --seq-len 4`" in joined
    assert "phases[1] (a).seq_len: 4 must be a number in [8, 512]" in joined
    assert len(problems) == 11


def test_load_config_reports_file_and_validation_problems_together(tmp_path):
    text = GOOD.replace("[train]", "[trian]").replace('tokenizer = "data/tok"', "").replace(
        'accelerator = "cpu"', 'accelerator = "gpu"')
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"invalid configuration in {tmp_path / 'run.toml'}:")
    assert "did you mean 'train'" in msg and "model.tokenizer" in msg and "'gpu' must be auto, cpu or cuda" in msg


def test_no_phases_is_an_error(tmp_path):
    msg = error_of(tmp_path, GOOD.split("[[phases]]")[0])
    assert "phases: add at least one [[phases]] table" in msg


def test_no_ssh_needs_node_rank_and_master_addr(tmp_path):
    msg = error_of(tmp_path, GOOD, ["distributed.no_ssh=true", "distributed.num_nodes=2"])
    assert "distributed.no_ssh: also set distributed.node_rank and distributed.master_addr" in msg
    msg = error_of(tmp_path, GOOD, ["distributed.node_rank=2", "distributed.num_nodes=2"])
    assert "distributed.node_rank: 2 must be in [0, num_nodes=2)" in msg


def test_max_predictions_default_and_explicit():
    assert max_predictions(PhaseSection(seq_len=128)) == 20  # BERT's caps: 20 at 128, 80 at 512
    assert max_predictions(PhaseSection(seq_len=512)) == 80
    assert max_predictions(PhaseSection(seq_len=100, mask_prob=0.2)) == 21  # round(100 * 0.2 * 25/24)
    assert max_predictions(PhaseSection(seq_len=8, mask_prob=0.01)) == 1
    assert max_predictions(PhaseSection(seq_len=128, max_predictions=5)) == 5


def test_resolve_paths_makes_paths_absolute(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["distributed.hostfile=hosts"])
    resolved = resolve_paths(cfg, base=tmp_path)
    assert resolved.run.out_dir == str(tmp_path.resolve() / "out" / "run")
    assert resolved.model.tokenizer == str(tmp_path.resolve() / "data" / "tok")
    # not in tmp_path: the shipped file of the checkout (the default, named relatively, from anywhere)
    assert resolved.distributed.deepspeed_config == str(REPO / "ds_configs" / "zero2.json")
    assert resolved.distributed.hostfile == str(tmp_path.resolve() / "hosts")
    assert [p.data for p in resolved.phases] == [str(tmp_path.resolve() / "data" / d) for d in ("d128", "d512")]
    # the input is left alone, and non-path fields are copied
    assert cfg.run.out_dir == "out/run" and cfg.phases[0].data == "data/d128"
    assert resolved.phases[1].lr == 5e-4 and resolved.run.seed == 7


def test_resolve_paths_prefers_a_deepspeed_json_in_the_current_directory(tmp_path):
    own = tmp_path / "ds_configs" / "zero2.json"
    own.parent.mkdir()
    own.write_text("{}")
    cfg = resolve_paths(load_config(write(tmp_path, GOOD)), base=tmp_path)
    assert cfg.distributed.deepspeed_config == str(own.resolve())
    missing = resolve_paths(load_config(write(tmp_path, GOOD), ["distributed.deepspeed_config=mine.json"]),
                            base=tmp_path)
    assert missing.distributed.deepspeed_config == str(tmp_path.resolve() / "mine.json")  # the error names it


def test_resolve_paths_defaults_to_cwd_and_keeps_absolute_and_unset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(phases=[PhaseSection(data="/abs/data")])
    resolved = resolve_paths(cfg)
    assert resolved.run.out_dir == str(tmp_path.resolve() / "runs" / "bert")
    assert resolved.phases[0].data == "/abs/data"
    assert resolved.distributed.hostfile is None and resolved.model.tokenizer == ""


def test_describe_lists_every_field_with_its_doc():
    text = describe()
    assert "  steps = 1000    # Optimizer steps in this phase." in text
    assert "  seed = 1234    # Seeds weights, shard order, shuffling and masking." in text
    sections = {"[run]": "run", "[model]": "model", "[distributed]": "distributed", "[optimizer]": "optimizer",
                "[train]": "train", "[data]": "data", "[[phases]]": "phases"}
    current = None
    seen: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line in sections:
            current = sections[line]
            seen[current] = set()
            continue
        name, rest = line.strip().split(" = ", 1)
        assert rest.split("    # ", 1)[1].strip(), f"{current}.{name} has no documentation"
        seen[current].add(name)
    cfg = RunConfig(phases=[PhaseSection()])
    for section in sections.values():
        obj = cfg.phases[0] if section == "phases" else getattr(cfg, section)
        assert seen[section] == {f.name for f in dataclasses.fields(obj)}


@pytest.mark.parametrize("item, attr, expected", [
    ("distributed.master_addr=10.0.0.1", ("distributed", "master_addr"), "10.0.0.1"),  # TOML would read a float
    ("run.name=inf", ("run", "name"), "inf"),                                          # TOML would read a float
    ("run.name=true", ("run", "name"), "true"),                                        # TOML would read a bool
    ("model.tokenizer=1e3", ("model", "tokenizer"), "1e3"),
    ('run.name="a b"', ("run", "name"), "a b"),                                        # quotes are optional
    ("phases.phase1.data=/x/y", ("phases", "data"), "/x/y"),
])
def test_string_fields_take_the_override_text_verbatim(tmp_path, item, attr, expected):
    cfg = load_config(write(tmp_path, GOOD), [item])
    section, name = attr
    obj = cfg.phases[0] if section == "phases" else getattr(cfg, section)
    value = getattr(obj, name)
    assert value == expected and isinstance(value, str)


def test_non_string_overrides_are_parsed_as_toml(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["distributed.timeout_minutes=2.5", "train.eval_interval=0x10",
                                              "phases.1.mask_prob=0.2", "distributed.rendezvous_timeout_minutes=5"])
    assert cfg.distributed.timeout_minutes == 2.5 and cfg.distributed.rendezvous_timeout_minutes == 5.0
    assert cfg.train.eval_interval == 16
    assert cfg.phases[1].mask_prob == 0.2


def test_type_error_from_file_and_override_where_validate_does_not_look(tmp_path):
    # run.seed and train.eval_batches are not range-checked by validate, so the type error surfaces cleanly
    msg = error_of(tmp_path, GOOD.replace("seed = 7", 'seed = "7"'), ["train.eval_batches=many"])
    assert "run.seed: expected an integer, got '7'" in msg
    assert "train.eval_batches: expected an integer, got 'many'" in msg


def test_validate_accepts_the_good_config(tmp_path):
    assert validate(load_config(write(tmp_path, GOOD))) == []


@pytest.mark.parametrize("override, message", [
    ("phases.phase1.lr=inf", "phases[0] (phase1).lr: inf must be a finite number > 0"),
    ("phases.phase1.lr=nan", "phases[0] (phase1).lr: nan must be a finite number > 0"),
    ("phases.phase2.lr=-1e-3", "phases[1] (phase2).lr: -0.001 must be a finite number > 0"),
    ("phases.phase1.warmup=1.5", "phases[0] (phase1).warmup: 1.5 must be a number in [0, 1]"),
    ("phases.phase1.decay_power=0", "phases[0] (phase1).decay_power: 0.0 must be a finite number > 0"),
    ("phases.phase1.mask_prob=1", "phases[0] (phase1).mask_prob: 1.0 must be a number in (0, 1)"),
    ("phases.phase1.max_predictions=0", "phases[0] (phase1).max_predictions: 0 must be a finite number >= 1; "
                                        "or leave it unset"),
    ("phases.phase1.steps=0", "phases[0] (phase1).steps: 0 must be a finite number >= 1"),
    ("optimizer.eps=0", "optimizer.eps: 0.0 must be a finite number > 0"),
    ("optimizer.eps=inf", "optimizer.eps: inf must be a finite number > 0"),
    ("optimizer.betas=[0.9, 1.0]", "optimizer.betas: [0.9, 1.0] must be two numbers in [0, 1)"),
    ("optimizer.betas=[nan, 0.9]", "optimizer.betas: [nan, 0.9] must be two numbers in [0, 1)"),
    ("optimizer.weight_decay=nan", "optimizer.weight_decay: nan must be a finite number >= 0"),
    ("optimizer.grad_clip=-1", "optimizer.grad_clip: -1.0 must be a finite number >= 0"),
    ("optimizer.max_trust_ratio=inf", "optimizer.max_trust_ratio: inf must be a finite number > 0; or leave it unset"),
    ("model.dropout=1.0", "model.dropout: 1.0 must be a number in [0, 1); or leave it unset"),
    ("model.hidden_size=0", "model.hidden_size: 0 must be a finite number >= 1; or leave it unset"),
    ("distributed.timeout_minutes=inf", "distributed.timeout_minutes: inf must be a finite number > 0"),
    ("distributed.timeout_minutes=0", "distributed.timeout_minutes: 0.0 must be a finite number > 0"),
    ("distributed.rendezvous_timeout_minutes=-1",
     "distributed.rendezvous_timeout_minutes: -1.0 must be a finite number > 0; or leave it unset"),
    ("distributed.threads_per_rank=0", "distributed.threads_per_rank: 0 must be a finite number >= 1"),
    ("train.save_interval=0", "train.save_interval: 0 must be a finite number >= 1"),
    ("train.shuffle_buffer=-5", "train.shuffle_buffer: -5 must be a finite number >= 0"),
    ("run.seed=-1", "run.seed: -1 must be a number in [0, 9.22337e+18]"),
    ("run.out_dir=", "run.out_dir: set it to the directory"),
    ("distributed.deepspeed_config=", "distributed.deepspeed_config: set it to a DeepSpeed JSON"),
])
def test_non_finite_and_out_of_range_values_are_refused_naming_key_and_range(tmp_path, override, message):
    assert message in error_of(tmp_path, GOOD, [override])


def test_every_number_of_the_configuration_has_a_range():
    """A numeric key added later cannot slip past validation: each one is in the range tables."""
    from typing import get_type_hints

    from bertscale.config import _PHASE_RANGES, _RANGES

    ranged = {f"{section}.{key}" for section, key, *_ in _RANGES} | {f"phases.{key}" for key, *_ in _PHASE_RANGES}
    numeric = set()
    for section, cls in [(f.name, type(getattr(RunConfig(), f.name))) for f in dataclasses.fields(RunConfig)
                         if f.name != "phases"] + [("phases", PhaseSection)]:
        for key, hint in get_type_hints(cls).items():
            if {int, float} & {hint, *getattr(hint, "__args__", ())}:
                numeric.add(f"{section}.{key}")
    assert numeric - ranged == {"optimizer.betas", "distributed.node_rank"}  # checked by rules of their own
