"""Why a phase failed, from what its ranks recorded (``RunDir.record_exit``) and what the launcher saw."""

from __future__ import annotations

from bertscale import checkpoint as ckpt
from bertscale.rundir import RunDir
from launcher.plan import PhasePlan

def failure_message(p: PhasePlan, returncode: int, exits: dict[int, dict], vanished: dict[int, float],
                     run_dir: RunDir) -> str:
    """Which rank failed first and how, then the others.

    A rank that raised reports it (``RunDir.record_exit``); a rank killed outright (SIGKILL, the OOM
    killer) reports nothing, and this launcher saw it vanish; the ranks that merely lost their connection
    to it report that. Order: real errors by time, then ranks that vanished without a word (by when they
    vanished), then lost connections. The first is named as the cause.
    """
    errors = sorted((r for r in exits.values() if r["status"] == "error" and not r.get("peer_lost")),
                    key=lambda r: r["time"])
    killed = sorted((t, rank) for rank, t in vanished.items() if rank not in exits)
    lost = sorted((r for r in exits.values() if r["status"] == "error" and r.get("peer_lost")),
                  key=lambda r: r["time"])
    port = p.command[p.command.index("--master_port") + 1] if "--master_port" in p.command else "?"
    lines = [f"rank {r['rank']} ({r['host']}): could not listen on master port {port}: another process holds it "
             f"(address already in use). Leave distributed.master_port unset on a single node (a free port is "
             f"picked per run) or choose another port  [{r['report']}]"
             if r.get("address_in_use") else f"rank {r['rank']} ({r['host']}): {r['summary']}  [{r['report']}]"
             for r in errors]
    lines += [f"rank {rank}: killed without a word (SIGKILL, the out-of-memory killer, or a crash in native code)"
              for _, rank in killed]
    lines += [f"rank {r['rank']} ({r['host']}): lost its connection to a failed rank ({r['summary']})" for r in lost]
    if not errors and not killed:  # the cause is out of this node's sight
        lines.insert(0, f"no rank reported an error of its own (the deepspeed launcher exited with {returncode}): "
                        f"a rank on another node was killed, or a node was lost")
    latest = ckpt.latest(run_dir.checkpoints)
    where = (f"the latest complete checkpoint is {latest.path} (global step {latest.global_step}). Fix the cause "
             f"and re-run the same command to continue from it." if latest else
             "there is no complete checkpoint yet. Fix the cause and re-run the same command to start again.")
    return (f"phase {p.phase.name!r} failed: {lines[0]}" + "".join(f"\n  then {line}" for line in lines[1:])
            + f"\n{where}")
