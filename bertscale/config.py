"""The run configuration: one typed tree, loaded from TOML, overridden by ``--set``, validated once.

Precedence is command line > file > defaults. Every field is documented where it is
declared; ``validate`` collects every problem and raises one ``ConfigError`` that says
how to fix each. Paths are resolved against the current working directory when the
launcher resolves the configuration, so the workers see absolute paths only.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from bertscale.storage import is_url


class ConfigError(ValueError):
    """One or more problems in a run configuration; the message lists all of them."""


@dataclass
class RunSection:
    name: str = "bert"
    """A label for the run, shown in logs and TensorBoard."""
    out_dir: str = "runs/bert"
    """Where checkpoints, TensorBoard events and the resolved configuration go."""
    seed: int = 1234
    """Seeds weights, shard order, shuffling and masking."""


ARCHITECTURE_OVERRIDES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
"""``[model]`` keys that override the preset's shape."""


@dataclass
class ModelSection:
    preset: str | None = None
    """Model size: tiny, mini, small, base or large (see bertscale/model.py); unset: base (or init_from's model)."""
    tokenizer: str = ""
    """Directory written by `bertscale tokenizer` (tokenizer.json, vocab.txt); unset with init_from: init_from's."""
    init_from: str = ""
    """A local Hugging Face BertForPreTraining or BertForMaskedLM directory (config.json, model.safetensors or
    pytorch_model.bin, tokenizer files) to continue pretraining from: its architecture and tokenizer become the
    run's (no preset or size overrides), heads it lacks (NSP) start fresh. Used by the first phase of a fresh
    run only: a resumed run continues from its checkpoint."""
    num_hidden_layers: int | None = None
    """Override the preset's number of layers."""
    hidden_size: int | None = None
    """Override the preset's hidden size."""
    num_attention_heads: int | None = None
    """Override the preset's number of attention heads."""
    intermediate_size: int | None = None
    """Override the preset's feed-forward size."""
    dropout: float | None = None
    """Override hidden and attention dropout (0.1 in every preset)."""
    fused_qkv: bool = True
    """Run query, key and value as one GEMM (weights keep Hugging Face's three names)."""
    fast_dropout: bool = True
    """CPU only: cheaper dropout masks and a matmul attention path while training (see PerfOptions)."""
    pad_vocab_multiple: int | None = None
    """Pad vocabulary rows to a multiple of this (stripped on conversion); None: 64 on CUDA, 1 on CPU."""
    sparse_last_layer: bool = True
    """Run the last layer past attention only on masked positions and [CLS] (exact; what the heads read)."""
    fused_mlm_loss: bool = True
    """Masked-LM cross-entropy and accuracy in one pass over the logits (exact; see PerfOptions)."""
    compile: bool = False
    """torch.compile each encoder layer; costs compile time up front, pays on long runs."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward: fits larger micro batches for ~1/3 more compute."""


@dataclass
class DistributedSection:
    deepspeed_config: str = "ds_configs/zero2.json"
    """Base DeepSpeed JSON (ZeRO settings); batch sizes, clipping and the precision section (train.precision) are filled in per phase. Relative: against the current directory, else the bertscale checkout's shipped ds_configs/."""
    accelerator: str = "auto"
    """auto (CUDA when present, else CPU), cuda or cpu. On CPU DeepSpeed runs with DS_ACCELERATOR=cpu and gloo. A hostfile launch (not no_ssh) needs cuda or cpu said: the launching machine cannot see its nodes' devices."""
    num_gpus: int | None = None
    """Ranks per node: GPUs, or CPU processes on a CPU-only machine (default: all GPUs, or 2 CPU ranks)."""
    num_nodes: int = 1
    """Number of nodes; more than one needs hostfile, or no_ssh with node_rank and master_addr."""
    hostfile: str | None = None
    """DeepSpeed hostfile ("host slots=N" per line) for multi-node runs."""
    launcher: str = "pdsh"
    """Multi-node launcher passed to deepspeed: pdsh, openmpi, mvapich, slurm."""
    no_ssh: bool = False
    """Run the same command on every node yourself (each with its node_rank); no ssh between nodes."""
    node_rank: int | None = None
    """This node's rank with no_ssh."""
    master_addr: str | None = None
    """Address of node 0 (required with no_ssh)."""
    master_port: int | None = None
    """TCP port of the rendezvous on node 0. Unset: a single-node run picks a free port itself (and logs it); a multi-node run uses 29500."""
    threads_per_rank: int | None = None
    """torch intra-op threads per rank on CPU (default: cores / local ranks)."""
    timeout_minutes: float = 10.0
    """How long a collective waits for a missing rank before the run fails (instead of hanging)."""
    rendezvous_timeout_minutes: float | None = None
    """How long the ranks wait for one another to join at start, apart from timeout_minutes, e.g. longer where a scheduler starts nodes minutes apart while a lost node should fail the run in seconds (default: timeout_minutes)."""


@dataclass
class OptimizerSection:
    name: str = "lamb"
    """lamb (bertscale.lamb on every accelerator: per-tensor trust ratios under any ZeRO stage) or adamw."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam moment decay rates."""
    eps: float = 1e-6
    """Added to the second-moment root."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases and LayerNorm weights."""
    bias_correction: bool = True
    """Adam bias correction of the moments."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm (0 disables)."""
    max_trust_ratio: float | None = None
    """LAMB: clamp each tensor's trust ratio ||w||/||update|| from above (none by default, as in You et al.)."""
    loss_scale_initial_power: int = 16
    """fp16 only: dynamic loss scaling starts at 2**this."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale is doubled."""
    loss_scale_hysteresis: int = 2
    """fp16 only: overflows tolerated before the loss scale is halved."""
    loss_scale_min: float = 1.0
    """fp16 only: the loss scale never drops below this (>= 1: never 0, never a division by zero)."""


@dataclass
class TrainSection:
    precision: str = "auto"
    """auto, bf16, fp16 or fp32. auto: bf16 where the hardware computes it natively (CUDA: Ampere and newer; CPU: avx512_bf16, amx_bf16 or ARM bf16), else fp16 with dynamic loss scaling on CUDA and fp32 on CPU (bertscale/hardware.py). The launcher decides on the ranks' machine and records why in OUT/run_config.json; a DeepSpeed JSON enabling bf16 or fp16 itself wins."""
    log_interval: int = 10
    """Optimizer steps between console lines and TensorBoard points."""
    save_interval: int = 1000
    """Optimizer steps between checkpoints (each phase's last step is always saved)."""
    keep_last: int = 2
    """Checkpoints kept besides the end of each phase."""
    num_workers: int = 1
    """Data loader worker processes per rank."""
    shuffle_buffer: int = 2000
    """Samples held in the in-memory shuffle buffer per worker."""
    eval_batches: int = 20
    """Held-out batches evaluated at the end of each phase (0 disables)."""
    eval_interval: int = 0
    """Also evaluate every this many optimizer steps (0: only at the end of each phase)."""
    max_bad_steps: int = 20
    """Stop after this many consecutive skipped steps with a non-finite loss or gradient (fp16: overflow at the minimum loss scale)."""
    unpadded: bool = True
    """Train on unpadded micro batches (``bertscale/packing.py``): the samples' real tokens end to end,
    attention within each sample, the same losses and gradients as padded rows without computing the
    padding. A micro batch stays a number of samples. False: rows padded to the batch's longest sample."""
    replicate_data: bool = False
    """Every rank reads the whole global batch and trains on its own block of it: a step's data no longer depends on the number of ranks (for equivalence checks; not for real runs)."""


@dataclass
class PhaseSection:
    name: str = "phase1"
    """Label of the phase (appears in tags and logs)."""
    seq_len: int = 128
    """Sequence length; must equal the shards' seq_len."""
    data: str = ""
    """Directory written by `bertscale shards` for this sequence length, or a URL prefix serving one (http(s)://, gs://, s3://, pipe:CMD with {} for the file)."""
    global_batch: int = 256
    """Sequences per optimizer step over all ranks (= micro_batch x accumulation x world size)."""
    micro_batch: int = 32
    """Sequences per rank per forward pass."""
    steps: int = 1000
    """Optimizer steps in this phase."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup: float = 0.1
    """Fraction of the phase's steps with linear warmup."""
    decay_power: float = 1.0
    """Polynomial decay power after warmup (1.0 linear, 0.5 as NVIDIA's recipe)."""
    max_predictions: int | None = None
    """Cap on masked positions per sample (default: 15% of seq_len, rounded up)."""
    mask_prob: float = 0.15
    """Fraction of tokens chosen for prediction."""
    carry_optimizer_state: bool = False
    """Start with the previous phase's optimizer moments (same ZeRO stage; on another number of ranks through DeepSpeed's universal checkpoint); the reference recipes reset them (false)."""


@dataclass
class DataSection:
    whole_word_masking: bool = False
    """Mask all word pieces of a chosen word together (BERT's whole-word masking)."""
    strict_shards: bool = False
    """Fail on a damaged shard (naming it) instead of skipping it with a warning and a counter."""


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    phases: list[PhaseSection] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def phase(self, name: str) -> tuple[int, PhaseSection]:
        for i, p in enumerate(self.phases):
            if p.name == name:
                return i, p
        raise ConfigError(f"no phase named {name!r}; phases are {[p.name for p in self.phases]}")


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}

DECIDED = "decided"
"""A top-level table of ``OUT/run_config.json`` that is not configuration: what the launcher decided on the
ranks' machine and why (``precision``: the choice, what was asked, the reason). Ignored when the file is read
back: ``train.precision`` beside it already holds the choice."""


def _known(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def _coerce(value: Any, hint: Any, where: str, errors: list[str]) -> Any:
    """Check one value against its annotation; ints are accepted where floats are expected."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is not None and type(None) in args:  # X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where, errors)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        errors.append(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        errors.append(f"{where}: expected an integer, got {value!r}")
        return value
    if hint in (str, float) and not isinstance(value, hint):
        errors.append(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, where: str, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a table, got {data!r}")
        return cls()
    hints = get_type_hints(cls)
    known = _known(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            errors.append(f"{where}.{key}: unknown key{_suggest(key, known)}")
            continue
        before = len(errors)
        coerced = _coerce(value, hints[key], f"{where}.{key}", errors)
        if len(errors) == before:  # an ill-typed value keeps the default, so validation can still run
            kwargs[key] = coerced
    return cls(**kwargs)


def from_dict(data: dict, errors: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from nested dicts (file contents); collects unknown keys and type errors."""
    own = errors is None
    errors = [] if errors is None else errors
    cfg = RunConfig()
    for key, value in data.items():
        if key == DECIDED:
            continue
        if key not in SECTIONS:
            errors.append(f"{key}: unknown section{_suggest(key, list(SECTIONS))}")
            continue
        if key == "phases":
            if not isinstance(value, list):
                errors.append("phases: expected a list of [[phases]] tables")
                continue
            cfg.phases = [_build(PhaseSection, p, f"phases[{i}]", errors) for i, p in enumerate(value)]
        else:
            section_cls = type(getattr(cfg, key))
            setattr(cfg, key, _build(section_cls, value, key, errors))
    if own and errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def _parse_value(text: str, cls: type | None = None, key: str | None = None) -> Any:
    """Parse an override value as a TOML literal (numbers, booleans, lists, quoted strings), else a bare string.

    Where the target field holds a string (a path, a host name), the text is taken as it is, so
    ``distributed.master_addr=10.0.0.1`` or a host called ``inf`` stay strings; quotes are optional.
    """
    if cls is not None and key is not None:
        hint = get_type_hints(cls).get(key)
        if hint is str or (get_origin(hint) is not None and set(get_args(hint)) == {str, type(None)}):
            stripped = text.strip()
            if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
                stripped = stripped[1:-1]
            return stripped
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` overrides to raw config dicts.

    Keys are dotted: ``train.log_interval=5``, ``phases.0.steps=100`` or ``phases.phase2.lr=4e-3``
    (a phase by index or by name).
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.log_interval=5")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        section_cls = PhaseSection if parts[0] == "phases" else (
            type(getattr(RunConfig(), parts[0])) if parts[0] in SECTIONS else None)
        value = _parse_value(text.strip(), section_cls, parts[-1])
        if parts[0] == "phases":
            if len(parts) != 3:
                raise ConfigError(f"--set {key}: phase keys look like phases.0.lr or phases.phase1.lr")
            phases = data.setdefault("phases", [])
            selector = parts[1]
            index = None
            if selector.isdigit():
                index = int(selector)
            else:
                names = [p.get("name", PhaseSection.name) for p in phases]
                if selector in names:
                    index = names.index(selector)
            if index is None or index >= len(phases):
                names = [p.get("name", PhaseSection.name) for p in phases]
                raise ConfigError(f"--set {key}: no phase {selector!r}; phases are {names} (or their indices)")
            phases[index][parts[2]] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"--set {key}: keys look like SECTION.FIELD, e.g. train.log_interval")
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"--set {key}: {parts[0]} is not a table")
        section[parts[1]] = value
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML (or the launcher's resolved JSON) run configuration, apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    return config_from_data(data, overrides, where=str(path))


def config_from_data(data: dict | RunConfig, overrides: list[str] | None = None,
                     where: str = "the run configuration given in code") -> RunConfig:
    """A validated RunConfig from nested dicts as a TOML file parses to (or a RunConfig, re-checked), with
    ``KEY=VALUE`` overrides applied; ``where`` names the source in the error."""
    if isinstance(data, RunConfig):
        data = data.to_dict()
    data = apply_overrides(data, overrides or [])
    errors: list[str] = []
    cfg = from_dict(data, errors)
    errors += validate(cfg)
    if errors:
        raise ConfigError(f"invalid configuration in {where}:\n  " + "\n  ".join(errors))
    return cfg


def _in_range(value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False) -> bool:
    """Whether a number is finite and within [low, high] (an open end excludes its bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


# (section, key, low, high, low_open, high_open, optional): every number of the configuration and the
# values it may take; an optional key may also be left unset (None).
_RANGES = [
    ("run", "seed", 0, 2 ** 63 - 1, False, False, False),
    ("model", "num_hidden_layers", 1, None, False, False, True),
    ("model", "hidden_size", 1, None, False, False, True),
    ("model", "num_attention_heads", 1, None, False, False, True),
    ("model", "intermediate_size", 1, None, False, False, True),
    ("model", "dropout", 0, 1, False, True, True),
    ("model", "pad_vocab_multiple", 1, None, False, False, True),
    ("distributed", "num_gpus", 1, None, False, False, True),
    ("distributed", "num_nodes", 1, None, False, False, False),
    ("distributed", "master_port", 1, 65535, False, False, True),
    ("distributed", "threads_per_rank", 1, None, False, False, True),
    ("distributed", "timeout_minutes", 0, None, True, False, False),
    ("distributed", "rendezvous_timeout_minutes", 0, None, True, False, True),
    ("optimizer", "eps", 0, None, True, False, False),
    ("optimizer", "weight_decay", 0, None, False, False, False),
    ("optimizer", "grad_clip", 0, None, False, False, False),
    ("optimizer", "max_trust_ratio", 0, None, True, False, True),
    ("optimizer", "loss_scale_initial_power", 0, 32, False, False, False),
    ("optimizer", "loss_scale_window", 1, None, False, False, False),
    ("optimizer", "loss_scale_hysteresis", 1, None, False, False, False),
    ("optimizer", "loss_scale_min", 1, None, False, False, False),
    ("train", "log_interval", 1, None, False, False, False),
    ("train", "save_interval", 1, None, False, False, False),
    ("train", "keep_last", 1, None, False, False, False),
    ("train", "num_workers", 0, None, False, False, False),
    ("train", "shuffle_buffer", 0, None, False, False, False),
    ("train", "eval_batches", 0, None, False, False, False),
    ("train", "eval_interval", 0, None, False, False, False),
    ("train", "max_bad_steps", 1, None, False, False, False),
]
_PHASE_RANGES = [
    ("seq_len", 8, 512, False, False, False),
    ("global_batch", 1, None, False, False, False),
    ("micro_batch", 1, None, False, False, False),
    ("steps", 1, None, False, False, False),
    ("lr", 0, None, True, False, False),
    ("warmup", 0, 1, False, False, False),
    ("decay_power", 0, None, True, False, False),
    ("max_predictions", 1, None, False, False, True),
    ("mask_prob", 0, 1, True, True, False),
]


# why a bound is where it is, where the range alone does not say
_WHY = {
    "optimizer.loss_scale_min": " (a loss scale near 0 divides by zero)",
    "train.max_bad_steps": " (consecutive skipped steps before the run stops)",
}


def _check_ranges(e: list[str], where: str, obj: Any, ranges) -> None:
    for key, low, high, low_open, high_open, optional in ranges:
        value = getattr(obj, key)
        if optional and value is None:
            continue
        if not _in_range(value, low, high, low_open=low_open, high_open=high_open):
            hint = _WHY.get(f"{where}.{key}", "") + ("; or leave it unset" if optional else "")
            e.append(f"{where}.{key}: {value!r} must be {_range_text(low, high, low_open, high_open)}{hint}")


def validate(cfg: RunConfig) -> list[str]:
    """Every problem the configuration has on its own (without looking at the machine): every number
    finite and in its range (named with the key and the range), every path set."""
    e: list[str] = []
    from bertscale.model import PRESETS  # local: the model owns the preset table
    from bertscale.hardware import PRECISIONS  # and the precision module its choices

    for section, key, *bounds in _RANGES:
        _check_ranges(e, section, getattr(cfg, section), [(key, *bounds)])
    m = cfg.model
    if m.preset is not None and m.preset not in PRESETS:
        e.append(f"model.preset: {m.preset!r} is not a preset{_suggest(m.preset, list(PRESETS))}")
    if not m.tokenizer and not m.init_from:
        e.append("model.tokenizer: set it to the directory written by `bertscale tokenizer`")
    if m.init_from:
        # the init_from model's config.json is the architecture: anything else that sets it is a contradiction
        shaped = [k for k in ("preset", *ARCHITECTURE_OVERRIDES) if getattr(m, k) is not None]
        if shaped:
            e.append(f"{', '.join(f'model.{k} = {getattr(m, k)!r}' for k in shaped)} and model.init_from = "
                     f"{m.init_from!r} both set the architecture; the init_from model's config.json decides it: "
                     f"remove {', '.join(f'model.{k}' for k in shaped)} (or init_from)")
    if not cfg.run.out_dir:
        e.append("run.out_dir: set it to the directory for checkpoints and logs, e.g. runs/bert")
    if not cfg.distributed.deepspeed_config:
        e.append("distributed.deepspeed_config: set it to a DeepSpeed JSON, e.g. ds_configs/zero2.json")
    if cfg.distributed.accelerator not in ("auto", "cpu", "cuda"):
        e.append(f"distributed.accelerator: {cfg.distributed.accelerator!r} must be auto, cpu or cuda")
    if cfg.distributed.launcher not in ("pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"):
        e.append(f"distributed.launcher: {cfg.distributed.launcher!r} is not a DeepSpeed multi-node launcher")
    if cfg.distributed.no_ssh and (cfg.distributed.node_rank is None or not cfg.distributed.master_addr):
        e.append("distributed.no_ssh: also set distributed.node_rank and distributed.master_addr")
    if cfg.distributed.node_rank is not None and not 0 <= cfg.distributed.node_rank < cfg.distributed.num_nodes:
        e.append(f"distributed.node_rank: {cfg.distributed.node_rank} must be in [0, num_nodes="
                 f"{cfg.distributed.num_nodes})")
    if cfg.train.precision not in PRECISIONS:
        close = difflib.get_close_matches(str(cfg.train.precision).lower(), PRECISIONS, n=1)
        e.append(f"train.precision: {cfg.train.precision!r} must be one of {', '.join(PRECISIONS)}"
                 + (f" (did you mean {close[0]!r}?)" if close else ""))
    if cfg.optimizer.name not in ("lamb", "adamw"):
        e.append(f"optimizer.name: {cfg.optimizer.name!r} must be lamb or adamw")
    if len(cfg.optimizer.betas) != 2 or not all(_in_range(b, 0, 1, high_open=True) for b in cfg.optimizer.betas):
        e.append(f"optimizer.betas: {cfg.optimizer.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    o = cfg.optimizer
    if _in_range(o.loss_scale_initial_power, 0, 32) and _in_range(o.loss_scale_min, 1) \
            and 2.0 ** o.loss_scale_initial_power < o.loss_scale_min:
        e.append("optimizer.loss_scale_initial_power: 2**power is below loss_scale_min")
    if not cfg.phases:
        e.append("phases: add at least one [[phases]] table (seq_len, data, global_batch, micro_batch, steps, lr)")
    names = [p.name for p in cfg.phases]
    if len(set(names)) != len(names):
        e.append(f"phases: names must be unique, got {names}")
    for i, p in enumerate(cfg.phases):
        w = f"phases[{i}] ({p.name})"
        if not p.data:
            e.append(f"{w}.data: set it to the directory written by `bertscale shards --seq-len {p.seq_len}`")
        _check_ranges(e, w, p, _PHASE_RANGES)
        if _in_range(p.micro_batch, 1) and _in_range(p.global_batch, 1) and p.global_batch % p.micro_batch:
            e.append(f"{w}.global_batch: {p.global_batch} is not a multiple of micro_batch {p.micro_batch}")
    return e


def accumulation_steps(phase: PhaseSection, world_size: int) -> int:
    """Gradient accumulation so that micro_batch x accumulation x world_size == global_batch."""
    per_step = phase.micro_batch * world_size
    if phase.global_batch % per_step:
        lower = (phase.global_batch // per_step) * per_step
        raise ConfigError(
            f"phase {phase.name!r}: global_batch {phase.global_batch} is not divisible by "
            f"micro_batch {phase.micro_batch} x world size {world_size} = {per_step}; "
            f"use a global_batch that is a multiple of {per_step} (e.g. {max(lower, per_step)}) "
            f"or change micro_batch or the number of ranks")
    return phase.global_batch // per_step


def max_predictions(phase: PhaseSection) -> int:
    """The phase's cap on predictions per sample (default: ``masking.default_max_predictions``)."""
    from bertscale.masking import default_max_predictions

    if phase.max_predictions is not None:
        return phase.max_predictions
    return default_max_predictions(phase.seq_len, phase.mask_prob)


def resolve_paths(cfg: RunConfig, base: Path | None = None) -> RunConfig:
    """Make every path absolute (against ``base``, default the current directory). A relative
    ``distributed.deepspeed_config`` that is not there but is one of the checkout's shipped
    ``ds_configs/`` (the default, run from another directory) resolves to the shipped file."""
    base = base or Path.cwd()

    def absolute(p: str | None) -> str | None:
        return str((base / p).resolve()) if p else p

    def deepspeed_json(p: str) -> str:
        # the shipped ds_configs/*.json, named relatively as the default does, from outside the checkout
        checkout = Path(__file__).resolve().parent.parent
        if p and not Path(p).is_absolute() and not (base / p).exists() and (checkout / p).is_file():
            return str(checkout / p)
        return absolute(p)

    cfg = dataclasses.replace(cfg)
    cfg.run = dataclasses.replace(cfg.run, out_dir=absolute(cfg.run.out_dir))
    init_from = absolute(cfg.model.init_from)
    # with init_from, its directory's tokenizer is the run's unless one is named (checked to be the same one)
    cfg.model = dataclasses.replace(cfg.model, init_from=init_from,
                                    tokenizer=absolute(cfg.model.tokenizer) or init_from)
    cfg.distributed = dataclasses.replace(
        cfg.distributed,
        deepspeed_config=deepspeed_json(cfg.distributed.deepspeed_config),
        hostfile=absolute(cfg.distributed.hostfile))
    # a phase's data may be a URL prefix: never a path to resolve
    cfg.phases = [dataclasses.replace(p, data=p.data if is_url(p.data) else absolute(p.data)) for p in cfg.phases]
    return cfg


def describe() -> str:
    """Every key with its default and documentation, for `bertscale pretrain --help-config`."""
    import ast
    import inspect

    lines = []
    for section_name, f in SECTIONS.items():
        cls = PhaseSection if section_name == "phases" else type(getattr(RunConfig(), section_name))
        header = "[[phases]]" if section_name == "phases" else f"[{section_name}]"
        lines.append(header)
        docs = _field_docs(cls, ast, inspect)
        defaults = {x.name: getattr(cls(), x.name) for x in dataclasses.fields(cls)}
        for name, default in defaults.items():
            lines.append(f"  {name} = {default!r}    # {docs.get(name, '')}")
    return "\n".join(lines)


def _field_docs(cls, ast, inspect) -> dict[str, str]:
    """Read the docstring that follows each field declaration."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # one line per key
    return docs
