"""Helpers for tests that train for real through the launcher: tiny data and a run config."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

from bertscale import checkpoint as ckpt
from bertscale.metrics import read_scalars
from bertscale.shards import build_shards
from bertscale.tokenizer import train_tokenizer
from conftest import write_generated_corpus

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_data(tmp: Path, n_docs: int = 300, seed: int = 11) -> dict[str, Path]:
    """A generated corpus, a tokenizer, and shards at 128 and 512."""
    corpus = write_generated_corpus(tmp / "corpus.txt", n_docs=n_docs, seed=seed)
    tok = train_tokenizer([corpus], vocab_size=300, out_dir=tmp / "tok", show_progress=False)
    for seq_len in (128, 512):
        build_shards([corpus], tok, seq_len=seq_len, out_dir=tmp / f"d{seq_len}", samples_per_shard=60,
                     seed=3, valid_fraction=0.05, show_progress=False)
    return {"corpus": corpus, "tokenizer": tok, "d128": tmp / "d128", "d512": tmp / "d512"}


def run_config(tmp: Path, data: dict[str, Path], *, out: Path | None = None, stage: int = 2, ranks: int = 2,
               steps: tuple[int, int] = (6, 2)) -> dict:
    """A two-phase run config for the tiny model on CPU (global batch 16 then 8, accumulation 2 at 2 ranks), as
    the nested dict ``pretrain`` takes (a TOML file parses to the same)."""
    return {
        "run": {"name": "test", "out_dir": str(out or tmp / "run"), "seed": 7},
        "model": {"preset": "tiny", "tokenizer": str(data["tokenizer"]), "num_hidden_layers": 1},
        "distributed": {"deepspeed_config": str(REPO / "ds_configs" / f"zero{stage}.json"), "accelerator": "cpu",
                        "num_gpus": ranks, "master_port": free_port()},
        "train": {"log_interval": 2, "save_interval": 3, "keep_last": 2, "eval_batches": 2},
        "phases": [
            {"name": "phase1", "seq_len": 128, "data": str(data["d128"]), "global_batch": 16, "micro_batch": 4,
             "steps": steps[0], "lr": 1e-3},
            {"name": "phase2", "seq_len": 512, "data": str(data["d512"]), "global_batch": 8, "micro_batch": 2,
             "steps": steps[1], "lr": 5e-4},
        ],
    }


def losses(out: Path) -> list[tuple[int, float]]:
    """A finished run's logged total loss per step (its TensorBoard events), as (step, loss)."""
    return read_scalars(out / "tensorboard")["loss/total"]


def optimizer_state(info: ckpt.CheckpointInfo) -> dict[str, tuple[int, float]]:
    """Per original tensor: LAMB's step count and the norm of its second moment (universal checkpoint)."""
    from bertscale import safe_load

    found = {}
    for folder in sorted((ckpt.universal_checkpoint(info) / "zero").iterdir()):
        if (folder / "exp_avg_sq.pt").is_file():
            # ZeRO-3's universal checkpoint keeps no per-tensor step: the rank files' (one count) stands in
            step = safe_load.load(folder / "step.pt") if (folder / "step.pt").is_file() else optimizer_steps(info)
            moment = safe_load.load(folder / "exp_avg_sq.pt")
            moment = moment["param"] if isinstance(moment, dict) else moment  # ZeRO-1/2 | ZeRO-3
            found[folder.name] = (int(step), float(moment.norm()))
    return found


def rank_optimizer_states(info: ckpt.CheckpointInfo) -> list[dict]:
    """Each rank's optimizer state dict (``state``, ``param_groups``) in a checkpoint's DeepSpeed files."""
    from bertscale import safe_load

    found = []
    for file in sorted(info.path.glob("*optim_states.pt")):
        sd = safe_load.load(file)["optimizer_state_dict"]
        found.append(sd.get("optimizer_state_dict") or sd["base_optimizer_state"])  # ZeRO-3 | ZeRO-1/2
    return found


def optimizer_steps(info: ckpt.CheckpointInfo) -> int:
    """The optimizer's step count in a checkpoint (the same for every tensor and rank, or an AssertionError)."""
    steps = {int(v["step"]) for sd in rank_optimizer_states(info) for v in sd["state"].values()}
    assert len(steps) == 1, f"{info.path}: optimizer step counts {sorted(steps)}"
    return steps.pop()


def write_config(tmp: Path, data: dict[str, Path], *, name: str = "run.json", **options) -> Path:
    """``run_config`` written where a command line can name it (``--config``): TMP/NAME as JSON, which
    ``pretrain --config`` reads like TOML (a ``.toml`` name is written as ``.json``)."""
    config = (tmp / name).with_suffix(".json")
    config.write_text(json.dumps(run_config(tmp, data, **options), indent=2))
    return config


@contextlib.contextmanager
def serve(directory: Path, fail: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, int]]]:
    """A real HTTP server on 127.0.0.1 (a free port, in a thread) serving directory read-only.

    Yields the base URL and a dict counting GET requests per path; paths in ``fail`` answer 500.
    """
    import functools
    import http.server
    import threading

    requests: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            requests[self.path] = requests.get(self.path, 0) + 1
            if self.path.lstrip("/") in fail:
                self.send_error(500, "injected failure")
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
