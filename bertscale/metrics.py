"""Training metrics: accumulated on device, reduced over ranks at each log interval, written by rank 0.

The only module that talks to TensorBoard. Tags are namespaced (``loss/mlm``,
``throughput/tokens_per_s``, ``memory/host_rss_gib``); rates are averaged over the log
interval, not taken from a single step.
"""

from __future__ import annotations

import json
import logging
import os
import time

import psutil
import torch

from bertscale.engine import all_reduce_sum

log = logging.getLogger(__name__)

# Order of the running sums kept on device between log points.
_SUMS = ("mlm_loss_sum", "mlm_correct", "mlm_count", "nsp_loss_sum", "nsp_correct", "nsp_count",
         "samples", "tokens", "computed_tokens", "computed_tokens_sq", "data_wait_s", "cpu_s")

# Dense bf16 peak per device (TFLOP/s) for throughput/mfu, by CUDA device name.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10": 125.0, "L4": 121.0, "V100": 125.0}


def device_peak_tflops() -> float | None:
    """The local GPU's dense bf16 peak, or None (CPU, unknown card)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def pretraining_flops(layers: int, hidden: int, vocab: int, seq_len: int, masked: int) -> float:
    """Model FLOPs of one training step (forward + backward) for one sequence:
    72·L·s·d² + 12·L·s²·d + 6·m·d·(d+V), with m the positions that go through the MLM head."""
    return 72 * layers * seq_len * hidden ** 2 + 12 * layers * seq_len ** 2 * hidden + 6 * masked * hidden * (hidden + vocab)


class Metrics:
    """Accumulate per micro batch; ``log`` at the interval (every rank calls it: it all-reduces)."""

    def __init__(self, tb_dir: str | None, rank: int, run_name: str, total_steps: int,
                 purge_step: int | None = None, model_dims: tuple[int, int, int] = (0, 0, 0),
                 world_size: int = 1, peak_tflops: float | None = None):
        """``purge_step``: on resume, TensorBoard hides events at or after this step that an earlier
        attempt wrote past its last checkpoint, so no step appears twice."""
        self.rank = rank
        self.model_dims = model_dims  # (layers, hidden, vocab) for model FLOPs
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.run_name = run_name
        self.total_steps = total_steps
        self.writer = None
        if rank == 0 and tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tb_dir, purge_step=purge_step)
        self._sums: torch.Tensor | None = None  # the device-side sums (_SUMS[:6])
        self._host = [0.0] * 4  # samples, tokens, computed tokens, their squares (_SUMS[6:10])
        self._data_wait = 0.0
        self._t0 = time.perf_counter()
        self._steps_in_interval = 0
        self._process = psutil.Process()
        self._cpu0 = self._cpu_seconds()
        self._start_time = time.perf_counter()
        self._start_step: int | None = None

    def add(self, out, counts: tuple[int, int, int, int]) -> None:
        """One micro batch's outputs and its ``packing.token_counts`` (read on the host before the batch
        went to the device). Nothing here waits for the device: the outputs are summed where they are,
        and the counts stay host numbers (a ``torch.tensor(x, device="cuda")`` per micro batch would make
        the host wait for the GPU's queue each time)."""
        values = torch.stack([
            out.mlm_loss.detach().float() * out.mlm_count, out.mlm_correct.float(), out.mlm_count.float(),
            out.nsp_loss.detach().float() * out.nsp_count, out.nsp_correct.float(), out.nsp_count.float(),
        ])
        self._sums = values if self._sums is None else self._sums + values
        for i, n in enumerate(counts):
            self._host[i] += n

    def add_data_wait(self, seconds: float) -> None:
        """Time this rank spent waiting for the loader's next batch (``throughput/data_wait_fraction``)."""
        self._data_wait += seconds  # a host float until the interval's one all-reduce

    def step_done(self) -> None:
        self._steps_in_interval += 1

    def log(self, step: int, phase: str, scalars: dict[str, float]) -> dict:
        """Reduce the interval's sums over ranks; rank 0 prints one line and writes every scalar.

        ``scalars`` are what the trainer knows (``optim/lr``, ``optim/grad_norm``, ``train/phase``, ...);
        this adds losses, accuracies, throughput, model FLOP/s, memory and CPU use over the interval.
        """
        sums = self._sums if self._sums is not None else torch.zeros(6)
        cpu = self._cpu_seconds()
        sums = torch.cat([sums.detach().cpu().double(), torch.tensor([*self._host, self._data_wait, cpu - self._cpu0],
                                                                     dtype=torch.float64)])
        sums = all_reduce_sum(sums)
        s = dict(zip(_SUMS, sums.tolist()))
        elapsed = time.perf_counter() - self._t0
        if self._start_step is None:
            self._start_step = step - self._steps_in_interval
        rate = (lambda x: x / elapsed) if elapsed > 0 else (lambda x: 0.0)
        layers, hidden, vocab = self.model_dims
        flops = (72 * layers * hidden ** 2 * s["computed_tokens"] + 12 * layers * hidden * s["computed_tokens_sq"]
                 + 6 * hidden * (hidden + vocab) * s["mlm_count"])
        row = {
            "loss/mlm": s["mlm_loss_sum"] / max(s["mlm_count"], 1),
            "loss/nsp": s["nsp_loss_sum"] / max(s["nsp_count"], 1),
            "accuracy/mlm": s["mlm_correct"] / max(s["mlm_count"], 1),
            "accuracy/nsp": s["nsp_correct"] / max(s["nsp_count"], 1),
            "throughput/samples_per_s": rate(s["samples"]),
            "throughput/tokens_per_s": rate(s["tokens"]),
            "throughput/tflops": rate(flops) / 1e12,
            # real / computed tokens (1.0 unpadded), and the share of the interval ranks waited on data
            "throughput/fill": s["tokens"] / max(s["computed_tokens"], 1),
            "throughput/data_wait_fraction": s["data_wait_s"] / (elapsed * self.world_size) if elapsed > 0 else 0.0,
            # real tokens per CPU second of every rank and its loader workers: unlike tokens_per_s, barely moved
            # by other jobs sharing the machine (what the trainer costs, not how long it waited for a core)
            "throughput/tokens_per_cpu_s": s["tokens"] / s["cpu_s"] if s["cpu_s"] > 0 else 0.0,
            "memory/host_rss_gib": self._process.memory_info().rss / 2 ** 30,
            "system/cpu_percent": psutil.cpu_percent(interval=None),
            **scalars,
        }
        row["loss/total"] = row["loss/mlm"] + row["loss/nsp"]
        if self.peak_tflops:
            row["throughput/mfu"] = row["throughput/tflops"] / (self.peak_tflops * self.world_size)
        if torch.cuda.is_available():
            row["memory/device_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if self.rank == 0:
            done = step - self._start_step
            steps_per_s = done / (time.perf_counter() - self._start_time)
            eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
            log.info("step %d/%d %s | loss %.4f (mlm %.4f nsp %.4f) | mlm acc %.3f | lr %.2e | %.1f samples/s | eta %s",
                     step, self.total_steps, phase, row["loss/total"], row["loss/mlm"], row["loss/nsp"],
                     row["accuracy/mlm"], scalars.get("optim/lr", float("nan")), row["throughput/samples_per_s"],
                     _hms(eta))
            if self.writer is not None:
                for tag, value in row.items():
                    self.writer.add_scalar(tag, value, step)
                self.writer.flush()
        self._sums = None
        self._host = [0.0] * 4
        self._data_wait = 0.0
        self._steps_in_interval = 0
        self._t0 = time.perf_counter()
        self._cpu0 = cpu
        return row

    def _cpu_seconds(self) -> float:
        """CPU seconds (user + system) this rank has used so far, with its loader workers: the live ones and
        those of finished epochs (counted in the rank's own times once they exit)."""
        t = self._process.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self._process.children(recursive=True):
            try:
                c = child.cpu_times()
            except psutil.Error:
                continue  # exited while we looked: its time moves to children_* once the rank reaps it
            total += c.user + c.system
        return total

    def log_eval(self, step: int, results: dict[str, float]) -> None:
        if self.rank == 0:
            log.info("eval at step %d: %s", step, json.dumps({k: round(v, 4) for k, v in results.items()}))
            if self.writer is not None:
                for key, value in results.items():
                    self.writer.add_scalar(f"eval/{key}", value, step)
                self.writer.flush()

    def log_config(self, config: dict) -> None:
        """The resolved configuration as text, and its scalar leaves as TensorBoard hparams."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        flat = {k: v for k, v in _flatten(config).items() if isinstance(v, (int, float, str, bool))}
        experiment, start, end = hparams(flat, {"eval/mlm_accuracy": 0.0, "loss/total": 0.0})
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _hms(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(_flatten(item, f"{name}.{item.get('name', i)}."))
        else:
            flat[name] = value
    return flat


def read_scalars(tb_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under a TensorBoard directory, as (step, value) lists, read with
    TensorBoard's own reader (purged steps of resumed runs are dropped, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
