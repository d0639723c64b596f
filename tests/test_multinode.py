"""Two nodes on one machine: two launcher processes in DeepSpeed's --no_ssh mode, node ranks 0 and 1,
master 127.0.0.1, one CPU rank each; both phases, then conversion. And a lost node: the survivor
fails within the collective timeout, the launcher names what failed, and re-running resumes."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bertscale import checkpoint as ckpt
from bertscale.convert import convert_checkpoint
from runs import free_port, write_config

pytestmark = pytest.mark.slow


def node_command(config: Path, node_rank: int, port: int, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "bertscale.cli", "pretrain", "--config", str(config),
            "--set", "distributed.no_ssh=true", "--set", "distributed.num_nodes=2",
            "--set", f"distributed.node_rank={node_rank}", "--set", "distributed.master_addr=127.0.0.1",
            "--set", f"distributed.master_port={port}", "--set", "distributed.num_gpus=1", *extra]


def start_nodes(config: Path, port: int, logs: Path, extra: list[str] = (),
                env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    procs = []
    for rank in (0, 1):
        log = open(logs / f"node{rank}.log", "w")
        procs.append(subprocess.Popen(node_command(config, rank, port, extra), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, env=env))
        procs[-1].log_path = log.name
    return procs


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        root = psutil.Process(proc.pid)
        tree = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def _log_tail(proc: subprocess.Popen) -> str:
    """The last lines a launcher wrote (start_nodes/start_hosts send its output to NODE.log)."""
    return "\n".join(Path(proc.log_path).read_text(errors="replace").splitlines()[-15:])


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_tree(q)
            tails = "\n".join(f"--- node {i}:\n{_log_tail(q)}" for i, q in enumerate(procs))
            pytest.fail(f"a node launcher did not finish within {timeout}s (hang)\n{tails}")
    return codes


def rank_variables(tmp_path: Path, names: tuple[str, ...]) -> dict[int, tuple[str | None, ...]]:
    """The variables ``names`` in the environment of each running rank of this test's run, by rank."""
    seen = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "bertscale.train" in cmd and any(str(tmp_path) in a for a in cmd):
            try:
                env = proc.environ()
                seen[int(env["RANK"])] = tuple(env.get(name) for name in names)
            except (psutil.Error, KeyError, ValueError):
                pass  # gone, or the deepspeed launcher itself (no RANK)
    return seen


def test_two_nodes_no_ssh_train_both_phases_and_convert(run_data, tmp_path):
    config = write_config(tmp_path, run_data, ranks=1)
    # the user's ~/.deepspeed_env (NCCL_*, LD_LIBRARY_PATH ...) reaches every rank; here "~" is the test
    # session's own HOME (conftest), which the launchers and their ranks inherit: never the developer's
    home = Path.home()
    assert home != Path(pwd.getpwuid(os.getuid()).pw_dir) and os.environ["HOME"] == str(home)
    env_file = home / ".deepspeed_env"
    env_file.write_text("BERTSCALE_FROM_DS_ENV=cluster-setting\n")
    try:
        procs = start_nodes(config, free_port(), tmp_path)
        seen: dict[int, tuple[str | None, str | None]] = {}
        while any(p.poll() is None for p in procs) and len(seen) < 2:
            seen.update(rank_variables(tmp_path, ("BERTSCALE_FROM_DS_ENV", "HOME")))
            time.sleep(0.2)
        codes = wait_all(procs, timeout=300)
    finally:
        env_file.unlink()  # later tests' launches find no ~/.deepspeed_env, as on a fresh machine
    logs = {r: (tmp_path / f"node{r}.log").read_text() for r in (0, 1)}
    assert codes == [0, 0], logs
    assert seen == {0: ("cluster-setting", str(home)), 1: ("cluster-setting", str(home))}, logs
    root = tmp_path / "run" / "checkpoints"
    final = ckpt.final_of_phase(root, 1)
    assert final is not None and final.meta["world_size"] == 2
    # accumulation is derived from the world size of two nodes x one rank: 16 / (4 x 2) = 2
    assert "accumulation 2 x world 2" in logs[0]
    assert (final.path / "rank-00000.pt").is_file() and (final.path / "rank-00001.pt").is_file()
    hf = convert_checkpoint(root, tmp_path / "hf")
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()


JOIN = """
import os, sys, time
import torch
import torch.distributed.distributed_c10d as c10d
from bertscale.engine import init_distributed
start = time.monotonic()
try:
    init_distributed("cpu", float(sys.argv[1]), float(sys.argv[2]))
except Exception as exc:
    print(f"gave up after {time.monotonic() - start:.0f}s: {type(exc).__name__}")
else:
    gloo = c10d._get_default_group()._get_backend(torch.device("cpu"))
    print(f"collectives {gloo.options._timeout.total_seconds()}s, joining {c10d._get_default_store().timeout.total_seconds()}s")
"""


def join(world_size: int, timeout_minutes: float, rendezvous_minutes: float) -> str:
    """What rank 0 of ``world_size`` ranks, started alone in a process of its own, says after
    ``engine.init_distributed(timeout_minutes, rendezvous_minutes)``."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)}
    done = subprocess.run([sys.executable, "-c", JOIN, str(timeout_minutes), str(rendezvous_minutes)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_the_rendezvous_and_the_collectives_have_their_own_timeouts():
    """distributed.rendezvous_timeout_minutes bounds the wait for every rank to join, timeout_minutes the
    collectives of the group that results (what the lost-node tests below wait out)."""
    assert join(1, timeout_minutes=0.25, rendezvous_minutes=2) == "collectives 15.0s, joining 120.0s"
    # a peer that never comes: rank 0 gives up after the rendezvous's 3 s, not the collectives' 10 minutes
    said = join(2, timeout_minutes=10, rendezvous_minutes=0.05)
    assert said.startswith("gave up after ") and int(said.split()[3].rstrip("s:")) < 60, said


# The collectives give up 15 s after a node is lost; the nodes may take two minutes to join, as a node
# starts late on a loaded machine.
SHORT_TIMEOUT = ["--set", "distributed.timeout_minutes=0.25", "--set", "distributed.rendezvous_timeout_minutes=2"]


def test_lost_node_fails_within_timeout_and_rerun_resumes(run_data, tmp_path):
    config_path = write_config(tmp_path, run_data, ranks=1, steps=(40, 2))
    port = free_port()
    timeout = [*SHORT_TIMEOUT, "--set", "train.save_interval=5"]
    procs = start_nodes(config_path, port, tmp_path, timeout)
    root = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while ckpt.latest(root) is None or ckpt.latest(root).global_step < 5:  # wait for a first checkpoint
        assert time.monotonic() < deadline, (tmp_path / "node0.log").read_text()
        assert procs[0].poll() is None, (tmp_path / "node0.log").read_text()
        time.sleep(0.5)
    kill_tree(procs[1])  # node 1 disappears: launcher and its worker
    t0 = time.monotonic()
    code0 = wait_all(procs[:1], timeout=180)[0]
    procs[1].wait()
    assert code0 != 0
    assert time.monotonic() - t0 < 150  # bounded by the collective timeout, not hours
    log0 = (tmp_path / "node0.log").read_text()
    assert "phase 'phase1' failed: no rank reported an error of its own" in log0
    assert "then rank 0 (" in log0 and "lost its connection to a failed rank" in log0
    resumed_from = ckpt.latest(root).global_step

    # the same command on both nodes continues from the latest complete checkpoint
    codes = wait_all(start_nodes(config_path, free_port(), tmp_path, timeout), timeout=300)
    log0 = (tmp_path / "node0.log").read_text()
    assert codes == [0, 0], log0
    assert f"resumed from {root / ckpt.tag_for(resumed_from)}" in log0
    assert ckpt.final_of_phase(root, 1).global_step == 42


# --- two hosts with their own addresses: network namespaces joined by a veth pair -----------------
# Addresses from 198.18.0.0/15 (reserved for network benchmark tests); they exist only inside the
# namespaces this test creates and removes.
# Namespace and device names are machine-wide: the pid keeps two test sessions on one machine apart.
_TAG = os.getpid() % 100000
HOSTS = {f"bs{_TAG}n0": ("198.18.0.1", f"bs{_TAG}v0"), f"bs{_TAG}n1": ("198.18.0.2", f"bs{_TAG}v1")}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    try:
        for ns in HOSTS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc.stderr!r}")
    try:
        (ns0, (addr0, dev0)), (ns1, (addr1, dev1)) = HOSTS.items()
        _ip("link", "add", dev0, "type", "veth", "peer", "name", dev1)
        for ns, (addr, dev) in HOSTS.items():
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield HOSTS
    finally:
        for ns in HOSTS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def start_hosts(config: Path, hosts: dict, logs: Path, extra: list[str] = ()) -> list[subprocess.Popen]:
    master = next(iter(hosts.values()))[0]
    procs = []
    for rank, (ns, (_, dev)) in enumerate(hosts.items()):
        cmd = ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={dev}",
               *node_command(config, rank, 29500, extra)]
        cmd[cmd.index("distributed.master_addr=127.0.0.1")] = f"distributed.master_addr={master}"
        log = open(logs / f"node{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        procs[-1].log_path = log.name
    return procs


def test_two_hosts_in_network_namespaces_and_one_cut_off(two_hosts, run_data, tmp_path):
    config = write_config(tmp_path, run_data, ranks=1, steps=(40, 2))
    settings = [*SHORT_TIMEOUT, "--set", "train.save_interval=5"]
    procs = start_hosts(config, two_hosts, tmp_path, settings)
    root = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while ckpt.latest(root) is None or ckpt.latest(root).global_step < 5:
        assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "node0.log").read_text()
        time.sleep(0.5)
    ns1, (_, dev1) = list(two_hosts.items())[1]
    _ip("-n", ns1, "link", "set", dev1, "down")  # host 1 drops off the network
    t0 = time.monotonic()
    codes = wait_all(procs, timeout=240)
    assert codes[0] != 0 and codes[1] != 0
    assert time.monotonic() - t0 < 200  # bounded by the collective timeout
    assert "failed" in (tmp_path / "node0.log").read_text()
    resumed_from = ckpt.latest(root).global_step

    _ip("-n", ns1, "link", "set", dev1, "up")  # back on the network: the same commands resume
    codes = wait_all(start_hosts(config, two_hosts, tmp_path, settings), timeout=300)
    log0 = (tmp_path / "node0.log").read_text()
    assert codes == [0, 0], log0
    assert f"resumed from {root / ckpt.tag_for(resumed_from)}" in log0
    assert ckpt.final_of_phase(root, 1).global_step == 42
