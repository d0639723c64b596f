"""What this machine has, and what follows from it: the accelerator (CUDA or CPU), whether its GPUs or its
CPU compute bf16 natively, and the precision a run trains in.

``accelerator`` decides ``auto`` (CUDA when torch sees a device, else CPU) for the launcher, the ranks and
``bertscale finetune`` alike.

``train.precision`` is ``auto`` (the default), ``bf16``, ``fp16`` or ``fp32``. ``auto`` means:

- on CUDA, bf16 where every device the ranks use computes it (Ampere and newer), else fp16 with dynamic loss
  scaling (V100, T4);
- on CPU, bf16 only where the CPU computes it natively (x86 ``avx512_bf16`` or ``amx_bf16``, ARM ``bf16``)
  and torch's bf16 matrix product runs at least as fast as its fp32 one (a measured check of a few
  milliseconds); else fp32. Where the CPU has no bf16 instructions torch emulates them: a 512x512 matrix
  product ran at 1.1 GFLOP/s in bf16 against 51.7 in fp32 on a 2-core AVX2 EPYC (47x), and a tiny BERT's
  demo went from 7 minutes to about 2 hours.

The launcher decides once, on the machine where the ranks run (``choose``), writes the choice into the run
configuration the ranks read (``train.precision``) and says why in the log, ``--dry-run`` and
``OUT/run_config.json``. A DeepSpeed JSON that enables ``bf16`` or ``fp16`` itself wins (``engine.json_precision``),
with a log line saying so. What each precision means to DeepSpeed (its ``bf16``/``fp16`` tables, loss scaling) is
``bertscale.engine``'s business; this module only decides.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from dataclasses import dataclass

import torch

from bertscale.config import ConfigError

ACCELERATORS = ("auto", "cpu", "cuda")
"""What ``distributed.accelerator`` (and ``bertscale finetune --device``) accepts."""


def accelerator(requested: str = "auto", setting: str = "distributed.accelerator") -> str:
    """'cuda' or 'cpu': ``requested``, with ``auto`` CUDA when torch sees a device. ``setting`` names what asked
    for it, in the error a request this machine cannot serve raises (``ConfigError``)."""
    if requested not in ACCELERATORS:
        raise ConfigError(f"{setting}: {requested!r} is not one of {', '.join(ACCELERATORS)}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} is 'cuda' but torch sees no CUDA device; use 'cpu' (or 'auto'), or install a "
                          f"CUDA build of torch")
    return requested


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
"""What ``train.precision`` accepts; every choice is one of the last three."""

EMULATED_BF16_SLOWDOWN = 40
"""How much slower bf16 runs than fp32 where the CPU has no bf16 instructions, roughly (47x for a 512x512
matrix product, 8.8x for a linear + GELU forward and backward, on a 2-core AVX2 EPYC; ~2 hours against
7 minutes for the demo): the figure the warnings name when no measurement was taken."""

X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FEATURES = ("bf16",)


@dataclass(frozen=True)
class CpuInfo:
    """What this machine's CPU says about itself."""

    model: str
    """Its model name (``/proc/cpuinfo``, ``sysctl`` or ``platform``), e.g. ``AMD EPYC 7B13``."""
    bf16_features: tuple[str, ...]
    """The native bf16 features it reports (``avx512_bf16``, ``amx_bf16``, ARM's ``bf16``); empty: none."""
    source: str
    """Where the features were read from."""
    torch_bf16_kernels: bool
    """Whether torch's CPU bf16 kernels (oneDNN) are enabled on this process: off on x86 without AVX-512, or
    where ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below it, even on a CPU that has the instructions."""

    @property
    def reports_native_bf16(self) -> bool:
        return bool(self.bf16_features) and self.torch_bf16_kernels

    def bf16_detail(self) -> str:
        """What the CPU and torch say about bf16 here, in a few words."""
        if self.reports_native_bf16:
            return ", ".join(self.bf16_features)
        if self.bf16_features:
            return f"{', '.join(self.bf16_features)} reported, but torch's oneDNN bf16 kernels are off{_isa_cap()}"
        return f"no {'/'.join(X86_BF16_FLAGS if _is_x86() else ARM_BF16_FEATURES)} in {self.source}"

    def describe_bf16(self) -> str:
        """The CPU's bf16 capability (what the benchmarks print beside their figures): native or emulated, and why."""
        return f"{'native' if self.reports_native_bf16 else 'emulated'} ({self.bf16_detail()})"


def _isa_cap() -> str:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return f" (ONEDNN_MAX_CPU_ISA={cap})" if cap else ""


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU model and native bf16 features, read once per process."""
    model, features, source = "", set(), "torch's CPU probe"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    if text:
        source = "/proc/cpuinfo"
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and value.strip() and not model:
                model = value.strip()
            elif key in ("flags", "features"):
                features |= set(value.split())
        found = [f for f in (X86_BF16_FLAGS if _is_x86() else ARM_BF16_FEATURES) if f in features]
    elif platform.system() == "Darwin":
        source = "sysctl"
        model = _sysctl("machdep.cpu.brand_string") or model
        found = ["bf16"] if _sysctl("hw.optional.arm.FEAT_BF16") == "1" else []
    else:  # no /proc/cpuinfo (Windows, ...): torch's own cpuinfo probe
        found = [name for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"),
                                          ("amx_bf16", "_is_amx_tile_supported"))
                 if getattr(torch.cpu, probe, lambda: False)()]
    return CpuInfo(model=model or platform.processor() or platform.machine() or "unknown CPU",
                   bf16_features=tuple(found), source=source, torch_bf16_kernels=_torch_bf16_kernels())


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _torch_bf16_kernels() -> bool:
    """x86: whether torch will run bf16 through oneDNN's native kernels; elsewhere: True (the measured check
    in ``bf16_speed`` then decides)."""
    if not _is_x86():
        return True
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else True
    except (RuntimeError, AttributeError):
        return True


@dataclass(frozen=True)
class Bf16Speed:
    """A bf16 matrix product's speed against fp32's on this CPU, one thread."""

    bf16_gflops: float
    fp32_gflops: float
    size: int = 256

    @property
    def slowdown(self) -> float:
        """fp32's speed / bf16's (above 1: bf16 is slower)."""
        return self.fp32_gflops / max(self.bf16_gflops, 1e-9)

    def describe(self) -> str:
        return (f"a {self.size}x{self.size} bf16 matrix product ran at {self.bf16_gflops:.1f} GFLOP/s vs "
                f"{self.fp32_gflops:.1f} in fp32")


@functools.lru_cache(maxsize=1)
def bf16_speed(n: int = 256, repeats: int = 5) -> Bf16Speed:
    """Measure once per process (a few milliseconds where bf16 is native, ~0.1 s where it is emulated): the best
    of ``repeats`` n x n matrix products per dtype, on one thread, after one untimed warm-up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        speed = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            torch.mm(a, b)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t)
            speed[dtype] = 2 * n ** 3 / max(best, 1e-9) / 1e9
    finally:
        torch.set_num_threads(threads)
    return Bf16Speed(bf16_gflops=speed[torch.bfloat16], fp32_gflops=speed[torch.float32], size=n)


NATIVE_SPEED = 1.0
"""The measured check's bar: bf16 counts as native when its matrix product is at least as fast as fp32's (native
bf16 runs 2-5x faster; emulated, 10-50x slower: no machine sits near the bar)."""


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and why in words: what the CPU reports, then, if it reports bf16,
    the measured check."""
    cpu = cpu_info()
    if not cpu.reports_native_bf16:
        return False, f"this CPU ({cpu.model}) has no native bf16 ({cpu.bf16_detail()})"
    speed = bf16_speed()
    if speed.slowdown > NATIVE_SPEED:
        return False, (f"this CPU ({cpu.model}) reports {', '.join(cpu.bf16_features)}, but {speed.describe()}: "
                       f"torch does not use them here")
    return True, f"this CPU ({cpu.model}) computes bf16 natively ({', '.join(cpu.bf16_features)}; {speed.describe()})"


def cuda_bf16(devices: int) -> tuple[bool, str]:
    """Whether each of the first ``devices`` CUDA devices (the ranks' on this node) computes bf16, and which do not."""
    lacking, names = [], []
    for i in range(max(1, min(devices, torch.cuda.device_count()))):  # more ranks than devices: DeepSpeed says so
        name = torch.cuda.get_device_name(i)
        names.append(name)
        with torch.cuda.device(i):
            try:
                ok = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch < 2.3: no emulation to exclude
                ok = torch.cuda.is_bf16_supported()
        if not ok:
            lacking.append(f"cuda:{i} {name}")
    if lacking:
        return False, f"{', '.join(lacking)} has no native bf16 (compute capability below 8.0)"
    return True, f"{', '.join(sorted(set(names)))} computes bf16 natively"


@dataclass(frozen=True)
class Precision:
    """The precision a run trains in, and why."""

    name: str
    """bf16, fp16 or fp32."""
    requested: str
    """``train.precision`` as configured (auto, bf16, fp16, fp32)."""
    reason: str
    """Why, in words: what decided it."""
    warning: str | None = None
    """Set when the choice will run much slower than the machine could (bf16 emulated on a CPU)."""

    def line(self) -> str:
        """The one line the log and ``--dry-run`` show."""
        return f"precision {self.name} (train.precision = {self.requested!r}): {self.reason}"

    def record(self) -> dict[str, str]:
        """What ``OUT/run_config.json`` keeps of the choice beside the configuration."""
        return {"precision": self.name, "requested": self.requested, "reason": self.reason,
                **({"warning": self.warning} if self.warning else {})}


def emulated_warning(speed: Bf16Speed | None = None) -> str:
    cpu = cpu_info()
    measured = (f"measured here: {speed.describe()}, {speed.slowdown:.0f}x slower"
                if speed is not None else f"about {EMULATED_BF16_SLOWDOWN}x slower")
    return (f"bf16 on a CPU without native bf16 ({cpu.model}: {cpu.bf16_detail()}): torch emulates it, "
            f"{measured} than fp32; train.precision = \"auto\" or \"fp32\" trains at full speed here")


def choose(requested: str, accelerator: str, devices: int = 1, json_precision: str | None = None,
           json_path: str = "the DeepSpeed JSON", local: bool = True) -> Precision:
    """The precision of a run on this machine: ``requested`` (``train.precision``) on ``accelerator`` with
    ``devices`` ranks on this node, unless the DeepSpeed JSON at ``json_path`` enables one itself
    (``json_precision``), which wins. Raises ``ConfigError`` for a precision the device cannot run.
    ``local`` false: the ranks run elsewhere (a hostfile's nodes), so this machine's devices say nothing
    about theirs: ``requested`` must not be auto, and only what no device could run is refused."""
    if requested not in PRECISIONS:
        raise ConfigError(f"train.precision: {requested!r} must be one of {', '.join(PRECISIONS)}")
    if json_precision is not None:
        reason = (f"{json_path} sets {'fp32 (bf16 and fp16 disabled)' if json_precision == 'fp32' else json_precision}"
                  f" explicitly, which wins over train.precision = {requested!r}; remove its bf16/fp16 table to let "
                  f"train.precision decide")
        name = json_precision
    elif requested != "auto":
        name, reason = requested, "as configured"
    elif not local:
        raise ConfigError("train.precision: 'auto' needs the ranks' own devices to decide; say bf16, fp16 or fp32")
    elif accelerator == "cuda":
        native, why = cuda_bf16(devices)
        name = "bf16" if native else "fp16"
        reason = f"auto: {why}" + ("" if native else "; fp16 with dynamic loss scaling instead")
    else:
        native, why = cpu_bf16_native()
        name = "bf16" if native else "fp32"
        reason = f"auto: {why}" + ("" if native else f"; fp32 instead (bf16 would be emulated, about "
                                                     f"{EMULATED_BF16_SLOWDOWN}x slower)")
    problem = unsupported(name, accelerator, devices if local else 0)
    if problem:
        raise ConfigError(problem + (f" ({json_path} sets it)" if json_precision is not None else ""))
    if not local:
        reason += " (each rank checks it against its own device at start)"
    warning = None
    if local and name == "bf16" and accelerator == "cpu" and (requested != "auto" or json_precision is not None):
        native, _ = cpu_bf16_native()
        if not native:
            warning = emulated_warning(bf16_speed())
    return Precision(name=name, requested=requested, reason=reason, warning=warning)


def unsupported(name: str, accelerator: str, devices: int = 1) -> str | None:
    """Why ``name`` cannot run on ``accelerator`` with this node's first ``devices`` devices (0: on no device in
    particular: only what no device of the kind could run), or None."""
    if name == "fp16" and accelerator == "cpu":
        return ("precision fp16 on CPU: DeepSpeed has no fp16 there (its ranks would fail at start: 'Type fp16 is "
                "not supported on your device'); set train.precision = \"auto\" (bf16 where the CPU has it, else "
                "fp32), or run on CUDA devices")
    if name == "bf16" and accelerator == "cuda" and devices > 0 and torch.cuda.is_available():
        native, why = cuda_bf16(devices)
        if not native:
            return f"precision bf16: {why}; set train.precision = \"fp16\" (or \"auto\", which picks it there)"
    return None


def machine_report() -> dict[str, str]:
    """The CPU and its bf16 capability, as the benchmarks print them beside their figures."""
    cpu = cpu_info()
    return {"cpu_model": cpu.model, "cpu_bf16": cpu.describe_bf16(), "cpu_count": str(os.cpu_count())}
