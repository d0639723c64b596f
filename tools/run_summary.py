#!/usr/bin/env python3
"""A run's state at a glance, for a terminal without TensorBoard.

    python tools/run_summary.py runs/bert-base          # text
    python tools/run_summary.py runs/bert-base --json   # one JSON object

Prints the latest step and phase, the last logged loss, accuracy and throughput, the held-out
evaluation, every checkpoint (complete or not) and any rank failures of the last attempt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bertscale import checkpoint as ckpt
from bertscale.metrics import read_scalars

SHOWN = ("loss/total", "loss/mlm", "loss/nsp", "accuracy/mlm", "accuracy/nsp", "optim/lr", "optim/grad_norm",
         "optim/skipped_steps", "throughput/samples_per_s", "throughput/tokens_per_s", "memory/host_rss_gib",
         "eval/mlm_accuracy", "eval/mlm_loss", "eval/nsp_accuracy")


def summarize(run_dir: str | Path) -> dict:
    run = Path(run_dir)
    if not (run / "run_config.json").is_file():
        raise SystemExit(f"{run} is not a bertscale run directory (no run_config.json); pass run.out_dir")
    scalars = read_scalars(run / "tensorboard") if (run / "tensorboard").is_dir() else {}
    latest = {tag: {"step": series[-1][0], "value": series[-1][1]} for tag, series in scalars.items()
              if tag in SHOWN and series}
    steps = max((series[-1][0] for series in scalars.values() if series), default=0)
    root = run / "checkpoints"
    checkpoints = []
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(ckpt.TAG_PREFIX)):
            complete = (path / ckpt.COMPLETE).is_file()
            meta = ckpt.read_meta(path) if (path / ckpt.META).is_file() else {}
            checkpoints.append({"tag": path.name, "complete": complete, "phase": meta.get("phase"),
                                "phase_complete": meta.get("state", {}).get("phase_complete", False)})
    failures = sorted(str(p) for p in (run / "failures").glob("rank-*.txt")) if (run / "failures").is_dir() else []
    config = json.loads((run / "run_config.json").read_text())
    total = sum(p["steps"] for p in config["phases"])
    return {"run": str(run), "name": config["run"]["name"], "latest_logged_step": steps, "total_steps": total,
            "scalars": latest, "checkpoints": checkpoints, "failures": failures}


def print_text(s: dict) -> None:
    print(f"run {s['name']} ({s['run']}): step {s['latest_logged_step']} of {s['total_steps']}")
    for tag, v in s["scalars"].items():
        print(f"  {tag:28s} {v['value']:.6g}  (step {v['step']})")
    print("checkpoints:")
    for c in s["checkpoints"] or [{"tag": "none", "complete": True, "phase": None, "phase_complete": False}]:
        flags = [] if c["complete"] else ["INCOMPLETE"]
        if c["phase_complete"]:
            flags.append(f"end of {c['phase']}")
        print(f"  {c['tag']} {c['phase'] or ''} {' '.join(flags)}")
    for f in s["failures"]:
        print(f"failure report: {f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run's out_dir (holds run_config.json, tensorboard/, checkpoints/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    summary = summarize(args.run_dir)
    print(json.dumps(summary)) if args.json else print_text(summary)


if __name__ == "__main__":
    main()
