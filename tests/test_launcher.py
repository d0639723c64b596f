"""The launcher: hostfiles, deepspeed command lines, world size, preflight checks and the phase plan.

Nothing here starts a rank: commands are checked flag by flag (and against DeepSpeed's own argument
parser), and `pretrain` runs with ``dry_run=True``.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertscale import checkpoint as ckpt
from bertscale.config import ConfigError, DistributedSection, PhaseSection, RunConfig, load_config
from bertscale.rundir import RunDir
from bertscale.tokenizer import train_tokenizer, tokenizer_info
from launcher.diagnose import failure_message
from launcher.environment import CPU_MALLOC_TUNABLES, user_env_files, worker_environment
from launcher.launch import pretrain
from launcher.plan import (deepspeed_command, deepspeed_executable, no_ssh_hostfile, node_file, parse_hostfile, plan,
                           preflight, resume_source, world_size)
from launcher.ports import check_port, pick_port
from runs import build_data, run_config, write_config


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def make_cfg(tmp_path: Path, **distributed) -> RunConfig:
    """Two phases on CPU ranks; ``distributed`` overrides DistributedSection fields."""
    cfg = RunConfig(phases=[PhaseSection(name="phase1", seq_len=128, data="d128", global_batch=16, micro_batch=4),
                            PhaseSection(name="phase2", seq_len=512, data="d512", global_batch=8, micro_batch=2)])
    cfg.run.out_dir = str(tmp_path / "run")
    cfg.distributed = DistributedSection(**{"accelerator": "cpu", **distributed})
    return cfg


def make_ckpt(root: Path, step: int, phase_index: int, phase_complete: bool, complete: bool = True,
              **meta) -> Path:
    path = root / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / ckpt.META).write_text(json.dumps(
        {"state": {"global_step": step, "phase_index": phase_index, "phase_complete": phase_complete}, **meta}))
    if complete:
        ckpt.mark_complete(path)
    return path


def ds_args(cmd: list[str]):
    """Parse a command with DeepSpeed's own launcher parser: every flag we pass must be one it knows."""
    from deepspeed.launcher.runner import parse_args

    assert cmd[0] == deepspeed_executable()
    return parse_args(cmd[1:])


# ---------------------------------------------------------------- hostfiles

def test_parse_hostfile_good_with_comments_and_blank_lines(tmp_path):
    path = write(tmp_path / "hosts", "# the cluster\n\nworker-1 slots=8\n   \nworker-2 slots=4  # half a node\n")
    assert parse_hostfile(str(path)) == {"worker-1": 8, "worker-2": 4}
    assert list(parse_hostfile(str(path))) == ["worker-1", "worker-2"]  # file order is node order


@pytest.mark.parametrize("text, fragment", [
    ("a slots=2\nb\n", ":2: expected 'HOSTNAME slots=N', got 'b'"),
    ("a slots=2\n\nb gpus=2\n", ":3: expected 'HOSTNAME slots=N', got 'b gpus=2'"),
    ("a slots=2 extra\n", ":1: expected 'HOSTNAME slots=N'"),
    ("a slots=two\n", ":1: slots must be a whole number, got 'slots=two'"),
    ("# c\na slots=0\n", ":2: host a has 0 slots; every host needs at least one"),
    ("a slots=2\nb slots=2\na slots=4\n", ":3: host a is listed twice"),
])
def test_parse_hostfile_errors_name_file_and_line(tmp_path, text, fragment):
    path = write(tmp_path / "hosts", text)
    with pytest.raises(ConfigError) as info:
        parse_hostfile(str(path))
    assert str(info.value).startswith(str(path) + ":")
    assert fragment in str(info.value)


def test_parse_hostfile_empty_and_missing(tmp_path):
    path = write(tmp_path / "hosts", "# only a comment\n\n")
    with pytest.raises(ConfigError, match="no hosts; write one 'HOSTNAME slots=N' line per node"):
        parse_hostfile(str(path))
    with pytest.raises(ConfigError, match=f"distributed.hostfile: {tmp_path / 'nope'} does not exist"):
        parse_hostfile(str(tmp_path / "nope"))


# ---------------------------------------------------------------- deepspeed commands

def test_command_one_node(tmp_path):
    cfg = make_cfg(tmp_path, num_gpus=2, master_port=29611)
    cfg_path = tmp_path / "run" / "run_config.json"
    cmd = deepspeed_command(cfg, cfg.phases[0], cfg_path, "cpu")
    assert cmd == [deepspeed_executable(), "--log_level", "warning", "--master_port", "29611", "--num_gpus", "2",
                   "--module", "bertscale.train", "--config", str(cfg_path), "--phase", "phase1"]
    args = ds_args(cmd)
    assert (args.num_gpus, args.master_port, args.module, args.user_script) == (2, 29611, True, "bertscale.train")
    assert args.user_args == ["--config", str(cfg_path), "--phase", "phase1"]


def test_command_one_node_default_cpu_ranks(tmp_path):
    cfg = make_cfg(tmp_path)
    cmd = deepspeed_command(cfg, cfg.phases[1], Path("c.json"), "cpu")
    assert cmd[cmd.index("--num_gpus") + 1] == "2"
    assert cmd[-2:] == ["--phase", "phase2"]


def test_command_many_nodes_without_hostfile_or_no_ssh_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, num_nodes=2, num_gpus=2)
    with pytest.raises(ConfigError, match="num_nodes > 1 needs distributed.hostfile, or no_ssh"):
        deepspeed_command(cfg, cfg.phases[0], Path("c.json"), "cpu")


def test_command_hostfile_openmpi(tmp_path):
    hosts = write(tmp_path / "hosts", "a slots=4\nb slots=4\nc slots=4\n")
    cfg = make_cfg(tmp_path, hostfile=str(hosts), launcher="openmpi", num_nodes=2, num_gpus=4, master_addr="a")
    cmd = deepspeed_command(cfg, cfg.phases[1], Path("/x/run_config.json"), "cuda")
    assert cmd == [deepspeed_executable(), "--log_level", "warning", "--master_port", "29500",
                   "--hostfile", str(hosts), "--launcher", "openmpi", "--num_nodes", "2", "--num_gpus", "4",
                   "--master_addr", "a",
                   "--module", "bertscale.train", "--config", "/x/run_config.json", "--phase", "phase2"]
    args = ds_args(cmd)
    assert (args.hostfile, args.launcher, args.num_nodes, args.num_gpus) == (str(hosts), "openmpi", 2, 4)


def test_command_hostfile_defaults_leave_sizing_to_the_hostfile(tmp_path):
    hosts = write(tmp_path / "hosts", "a slots=2\nb slots=2\n")
    cfg = make_cfg(tmp_path, hostfile=str(hosts))
    cmd = deepspeed_command(cfg, cfg.phases[0], Path("c.json"), "cpu")
    assert cmd[5:9] == ["--hostfile", str(hosts), "--launcher", "pdsh"]
    for flag in ("--num_nodes", "--num_gpus", "--master_addr", "--no_ssh"):
        assert flag not in cmd


def test_command_no_ssh_uses_the_generated_hostfile(tmp_path):
    cfg = make_cfg(tmp_path, no_ssh=True, node_rank=1, master_addr="127.0.0.1", num_nodes=2, num_gpus=2,
                   master_port=29612)
    cmd = deepspeed_command(cfg, cfg.phases[0], Path("/x/c.json"), "cpu")
    generated = tmp_path / "run" / "hostfile.no_ssh.node1"
    assert cmd == [deepspeed_executable(), "--log_level", "warning", "--master_port", "29612",
                   "--hostfile", str(generated), "--no_ssh", "--node_rank", "1", "--master_addr", "127.0.0.1",
                   "--num_nodes", "2", "--num_gpus", "2",
                   "--module", "bertscale.train", "--config", "/x/c.json", "--phase", "phase1"]
    args = ds_args(cmd)
    assert (args.no_ssh, args.node_rank, args.master_addr, args.num_nodes) == (True, 1, "127.0.0.1", 2)
    # the file the command names is the one pretrain writes, and it sizes the job like world_size does
    assert no_ssh_hostfile(cfg, "cpu") == generated
    assert generated.read_text() == "node0 slots=2\nnode1 slots=2\n"
    assert sum(parse_hostfile(str(generated)).values()) == world_size(cfg, "cpu") == 4


def test_no_ssh_nodes_sharing_out_dir_each_read_their_own_files(tmp_path):
    """Two --no_ssh launchers on one shared run.out_dir: neither reads (or renames) the other's files.
    (Once both wrote run_config.json through one temporary name and node 1 died on the rename.)"""
    nodes = [make_cfg(tmp_path, no_ssh=True, node_rank=r, master_addr="h", num_nodes=2, num_gpus=1) for r in (0, 1)]
    configs = [plan(cfg)[0].command for cfg in nodes]
    paths = [Path(cmd[cmd.index("--config") + 1]) for cmd in configs]
    assert paths == [tmp_path / "run" / "run_config.node0.json", tmp_path / "run" / "run_config.node1.json"]
    assert node_file(nodes[1], ".deepspeed_env") == tmp_path / "run" / ".deepspeed_env.node1"
    assert node_file(make_cfg(tmp_path), "run_config.json") == tmp_path / "run" / "run_config.json"


def test_command_no_ssh_with_a_given_hostfile(tmp_path):
    hosts = write(tmp_path / "hosts", "n0 slots=2\nn1 slots=2\n")
    cfg = make_cfg(tmp_path, no_ssh=True, node_rank=0, master_addr="n0", num_nodes=2, hostfile=str(hosts))
    cmd = deepspeed_command(cfg, cfg.phases[0], Path("c.json"), "cpu")
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts)


# ---------------------------------------------------------------- world size

def test_world_size_one_node_and_no_ssh(tmp_path):
    assert world_size(make_cfg(tmp_path, num_gpus=2), "cpu") == 2
    assert world_size(make_cfg(tmp_path), "cpu") == 2  # default CPU ranks
    assert world_size(make_cfg(tmp_path, num_gpus=3, num_nodes=4, no_ssh=True, node_rank=0,
                               master_addr="h"), "cpu") == 12


def test_world_size_from_hostfile(tmp_path):
    hosts = str(write(tmp_path / "hosts", "a slots=4\nb slots=4\nc slots=2\n"))
    assert world_size(make_cfg(tmp_path, hostfile=hosts), "cuda") == 10                # every host
    assert world_size(make_cfg(tmp_path, hostfile=hosts, num_nodes=2), "cuda") == 8   # first two hosts
    assert world_size(make_cfg(tmp_path, hostfile=hosts, num_nodes=3, num_gpus=2), "cuda") == 6  # capped
    assert world_size(make_cfg(tmp_path, hostfile=hosts, num_nodes=2, num_gpus=1), "cuda") == 2
    with pytest.raises(ConfigError, match=f"num_nodes is 4 but {hosts} lists 3 hosts"):
        world_size(make_cfg(tmp_path, hostfile=hosts, num_nodes=4), "cuda")


@pytest.mark.parametrize("num_nodes, num_gpus", [(1, None), (2, None), (3, None), (2, 2), (3, 1)])
def test_world_size_matches_what_deepspeed_launches(tmp_path, num_nodes, num_gpus):
    """The launcher's world size equals the ranks DeepSpeed's runner allocates for the same command."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, fetch_hostfile

    hosts = str(write(tmp_path / "hosts", "a slots=4\nb slots=4\nc slots=2\n"))
    cfg = make_cfg(tmp_path, hostfile=hosts, num_nodes=num_nodes, num_gpus=num_gpus)
    args = ds_args(deepspeed_command(cfg, cfg.phases[0], Path("c.json"), "cuda"))
    resources = apply_num_nodes_and_gpus(fetch_hostfile(args.hostfile), args.num_nodes, args.num_gpus)
    # the runner keeps a slot count per host, or a list of slots once --num_gpus trimmed it
    assert world_size(cfg, "cuda") == sum(s if isinstance(s, int) else len(s) for s in resources.values())


# ---------------------------------------------------------------- port and failures

def test_check_port_refuses_a_listening_port(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(ConfigError, match=f"master_port {port} is in use.*master_port={port + 1}"):
            check_port(make_cfg(tmp_path, master_port=port))
        # a node that does not host the rendezvous does not check
        check_port(make_cfg(tmp_path, master_port=port, no_ssh=True, node_rank=1, num_nodes=2, master_addr="h"))


def test_check_port_passes_on_a_free_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_port(make_cfg(tmp_path, master_port=port))
    check_port(make_cfg(tmp_path, master_port=port))  # it releases the port it probed


def _failed(rank_dir: RunDir, rank: int, exc: BaseException) -> None:
    try:
        raise exc
    except BaseException as raised:  # a real traceback, as a rank has
        rank_dir.record_exit(rank, "error", raised)


def test_failure_message_names_the_rank_that_failed_first(tmp_path, capsys):
    """A rank's own error comes before the ranks that lost their connection to it, whatever their times;
    ranks that vanished without a record (killed) come before those too; older attempts are ignored."""
    cfg = make_cfg(tmp_path)
    run = RunDir.of(cfg)
    _failed(run, 3, RuntimeError("from an earlier attempt"))
    old = run.exits / "rank-00003.json"
    since = time.time()
    os.utime(old, (since - 100, since - 100))
    _failed(run, 0, RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4711"))
    _failed(run, 2, ValueError("bad shard data/train/shard-000003.tar"))
    assert "rank 2 failed: ValueError: bad shard" in capsys.readouterr().err  # the console gets one line each
    exits = run.exits_since(since)
    assert sorted(exits) == [0, 2] and exits[0]["peer_lost"] and not exits[2]["peer_lost"]
    plan_ = plan(cfg)[0]
    message = failure_message(plan_, 1, exits, {1: since + 5, 0: since + 6}, run)
    lines = message.splitlines()
    assert lines[0] == (f"phase 'phase1' failed: rank 2 ({exits[2]['host']}): ValueError: bad shard "
                        f"data/train/shard-000003.tar  [{run.failures / 'rank-00002.txt'}]")
    assert lines[1].startswith("  then rank 1: killed without a word (SIGKILL")
    assert lines[2].startswith("  then rank 0 (") and "lost its connection" in lines[2]
    assert "Connection closed by peer" in lines[2]
    assert "there is no complete checkpoint yet" in message and "rank 3" not in message
    assert "Traceback" in (run.failures / "rank-00002.txt").read_text()


def test_failure_message_of_a_killed_rank_names_it_not_the_survivor(tmp_path):
    cfg = make_cfg(tmp_path)
    run = RunDir.of(cfg)
    since = time.time()
    _failed(run, 0, RuntimeError("Connection reset by peer"))
    message = failure_message(plan(cfg)[0], 1, run.exits_since(since), {1: since + 1.0}, run)
    assert message.startswith("phase 'phase1' failed: rank 1: killed without a word")
    assert "then rank 0" in message


def test_a_taken_master_port_is_reported_as_such_not_as_a_lost_peer(tmp_path):
    """Rank 0 opening the rendezvous on a port another process holds (torch raises it as a DistNetworkError,
    like a lost peer): the failure says the port is taken, and with no checkpoint it does not offer one."""
    import torch.distributed as dist

    cfg = make_cfg(tmp_path, master_port=29613)
    run = RunDir.of(cfg)
    since = time.time()
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(dist.DistNetworkError) as info:
            dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    _failed(run, 0, info.value)
    _failed(run, 1, RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4711"))
    exits = run.exits_since(since)
    assert exits[0]["address_in_use"] and not exits[0]["peer_lost"]
    assert exits[1]["peer_lost"] and not exits[1]["address_in_use"]
    message = failure_message(plan(cfg)[0], 1, exits, {}, run)
    assert message.startswith(f"phase 'phase1' failed: rank 0 ({exits[0]['host']}): could not listen on master "
                              f"port 29613: another process holds it (address already in use)")
    assert "no rank reported an error" not in message
    assert message.endswith("there is no complete checkpoint yet. Fix the cause and re-run the same command to "
                            "start again.")


def test_an_unset_master_port_is_picked_free_on_one_node_only(tmp_path):
    one = make_cfg(tmp_path)
    port = pick_port(one)
    assert port is not None
    with socket.socket() as probe:
        probe.bind(("", port))  # free when picked
    cmd = plan(one, port=port)[0].command
    assert cmd[cmd.index("--master_port") + 1] == str(port)
    assert pick_port(make_cfg(tmp_path, master_port=29614)) is None  # a configured port is kept
    no_ssh = make_cfg(tmp_path, no_ssh=True, node_rank=0, num_nodes=2, master_addr="127.0.0.1")
    assert pick_port(no_ssh) is None  # every node must agree on it: DeepSpeed's default, 29500
    cmd = deepspeed_command(no_ssh, no_ssh.phases[0], Path("c.json"), "cpu")
    assert cmd[cmd.index("--master_port") + 1] == "29500"


# ---------------------------------------------------------------- resume and plan

def test_resume_source_auto(tmp_path):
    cfg = make_cfg(tmp_path, num_gpus=2)
    assert resume_source(cfg, "auto") is None
    root = tmp_path / "run" / "checkpoints"
    make_ckpt(root, 3, 0, False)
    make_ckpt(root, 6, 0, True)
    make_ckpt(root, 7, 1, False, complete=False)
    assert resume_source(cfg, "auto").tag == "step00000006"


def test_resume_source_never(tmp_path):
    cfg = make_cfg(tmp_path, num_gpus=2)
    root = tmp_path / "run" / "checkpoints"
    make_ckpt(root, 3, 0, False, complete=False)
    assert resume_source(cfg, "never") is None  # an incomplete directory is not a checkpoint
    make_ckpt(root, 6, 0, True)
    with pytest.raises(ConfigError, match=r"--resume never, but .*checkpoints already holds checkpoints "
                                          r"\(latest step00000006\)"):
        resume_source(cfg, "never")


def test_resume_source_path(tmp_path):
    cfg = make_cfg(tmp_path, num_gpus=2)
    other = tmp_path / "other" / "checkpoints"
    make_ckpt(other, 4, 0, False)
    make_ckpt(other, 8, 1, False)
    assert resume_source(cfg, str(other)).tag == "step00000008"
    assert resume_source(cfg, str(other / "step00000004")).global_step == 4
    with pytest.raises(ConfigError, match=f"--resume {tmp_path / 'empty'}: no complete checkpoint"):
        resume_source(cfg, str(tmp_path / "empty"))
    make_ckpt(other, 9, 1, False, complete=False)
    with pytest.raises(ConfigError, match="incomplete"):
        resume_source(cfg, str(other / "step00000009"))


def test_plan_without_source(tmp_path):
    cfg = make_cfg(tmp_path, num_gpus=2)
    plans = plan(cfg)
    assert [(p.index, p.phase.name, p.world_size, p.accumulation, p.complete) for p in plans] == [
        (0, "phase1", 2, 2, False), (1, "phase2", 2, 2, False)]
    config_path = str(tmp_path / "run" / "run_config.json")
    for p in plans:
        assert p.command[-4:] == ["--config", config_path, "--phase", p.phase.name]


@pytest.mark.parametrize("phase_index, phase_complete, expected", [
    (0, False, [False, False]),
    (0, True, [True, False]),
    (1, False, [True, False]),
    (1, True, [True, True]),
])
def test_plan_marks_phases_complete_from_the_source(tmp_path, phase_index, phase_complete, expected):
    cfg = make_cfg(tmp_path, num_gpus=2)
    source = ckpt.resolve(make_ckpt(tmp_path / "elsewhere", 5, phase_index, phase_complete))
    assert [p.complete for p in plan(cfg, source)] == expected


def test_plan_marks_phases_complete_from_the_run_own_checkpoints(tmp_path):
    cfg = make_cfg(tmp_path, num_gpus=2)
    root = tmp_path / "run" / "checkpoints"
    make_ckpt(root, 4, 0, True)
    make_ckpt(root, 6, 1, True, complete=False)  # not finished writing: phase 2 still to do
    assert [p.complete for p in plan(cfg)] == [True, False]


def test_plan_rejects_a_batch_the_world_cannot_split(tmp_path):
    cfg = make_cfg(tmp_path, num_gpus=3)
    with pytest.raises(ConfigError, match="phase 'phase1': global_batch 16 is not divisible by micro_batch 4 x "
                                          "world size 3 = 12"):
        plan(cfg)


# ---------------------------------------------------------------- preflight and dry run on real data

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return build_data(tmp_path_factory.mktemp("launcher_data"), n_docs=120)


def real_cfg(built: dict[str, Path], tmp_path: Path, **phase1) -> RunConfig:
    cfg = make_cfg(tmp_path, num_gpus=2)
    cfg.model.tokenizer = str(built["tokenizer"])
    cfg.phases[0].data, cfg.phases[1].data = str(built["d128"]), str(built["d512"])
    for key, value in phase1.items():
        setattr(cfg.phases[0], key, value)
    return cfg


def test_preflight_passes_on_matching_data(data, tmp_path):
    preflight(real_cfg(data, tmp_path), 2)


def test_preflight_refuses_fp16_on_cpu(data, tmp_path):
    """DeepSpeed has no fp16 on CPU: the run is refused before any rank starts, not by every rank at start,
    whether train.precision or the DeepSpeed JSON asks for it."""
    cfg = real_cfg(data, tmp_path)
    cfg.train.precision = "fp16"
    with pytest.raises(ConfigError, match=r"precision fp16 on CPU: DeepSpeed has no fp16 there.*"
                                          r"set train.precision = \"auto\""):
        preflight(cfg, 2, "cpu")
    own = tmp_path / "fp16.json"
    own.write_text('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    cfg = real_cfg(data, tmp_path)
    cfg.distributed.deepspeed_config = str(own)
    with pytest.raises(ConfigError, match=rf"precision fp16 on CPU.*\({own} sets it\)"):
        preflight(cfg, 2, "cpu")


def test_preflight_seq_len_mismatch(data, tmp_path):
    cfg = real_cfg(data, tmp_path, data=str(data["d512"]))
    with pytest.raises(ConfigError) as info:
        preflight(cfg, 2)
    msg = str(info.value)
    assert msg.startswith("the run cannot start:")
    assert (f"phase 'phase1': shards in {data['d512']} were built with seq_len 512 but the phase trains at 128"
            in msg)
    assert "rebuild with --seq-len 128" in msg


def test_preflight_shards_at_64_for_a_phase_at_128(shard_dir, tokenizer_dir, tmp_path):
    cfg = make_cfg(tmp_path, num_gpus=2)
    cfg.model.tokenizer = str(tokenizer_dir)
    cfg.phases = [PhaseSection(name="phase1", seq_len=128, data=str(shard_dir), global_batch=16, micro_batch=4)]
    with pytest.raises(ConfigError, match=f"shards in {shard_dir} were built with seq_len 64 but the phase "
                                          f"trains at 128"):
        preflight(cfg, 2)


def test_preflight_tokenizer_mismatch(data, corpus_file, tmp_path):
    other = train_tokenizer([corpus_file], vocab_size=150, out_dir=tmp_path / "other_tok", show_progress=False)
    cfg = real_cfg(data, tmp_path)
    cfg.model.tokenizer = str(other)
    with pytest.raises(ConfigError) as info:
        preflight(cfg, 2)
    msg = str(info.value)
    fingerprint = tokenizer_info(other).fingerprint
    assert f"but the run uses tokenizer {fingerprint}" in msg
    assert f"shards in {data['d128']}" in msg and f"shards in {data['d512']}" in msg  # both phases reported


def test_preflight_batch_not_divisible_and_missing_data_reported_together(data, tmp_path):
    cfg = real_cfg(data, tmp_path, global_batch=12)  # 12 % (4 x 2) != 0
    cfg.phases[1].data = str(tmp_path / "no_such_shards")
    with pytest.raises(ConfigError) as info:
        preflight(cfg, 2)
    msg = str(info.value)
    assert "phase 'phase1': global_batch 12 is not divisible by micro_batch 4 x world size 2 = 8" in msg
    assert "multiple of 8 (e.g. 8)" in msg
    assert f"phase 'phase2': no index.json in {tmp_path / 'no_such_shards'}" in msg


def test_preflight_missing_tokenizer(data, tmp_path):
    cfg = real_cfg(data, tmp_path)
    cfg.model.tokenizer = str(tmp_path / "no_tok")
    with pytest.raises(ConfigError, match="model.tokenizer: no vocab.txt in"):
        preflight(cfg, 2)


def test_cpu_ranks_keep_freed_memory_unless_the_user_tunes_malloc(tmp_path, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    cfg = make_cfg(tmp_path, threads_per_rank=3)
    env = worker_environment(cfg, "cpu")
    assert env["GLIBC_TUNABLES"] == CPU_MALLOC_TUNABLES and env["OMP_NUM_THREADS"] == "3"
    assert "GLIBC_TUNABLES" not in worker_environment(cfg, "cuda")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert "GLIBC_TUNABLES" not in worker_environment(cfg, "cpu")  # theirs reaches the ranks unchanged


def test_pretrain_dry_run_prints_every_phase_command(data, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, data, out=out)
    result = pretrain(str(config), ["phases.phase2.steps=3"], dry_run=True)
    assert result == out
    printed = capsys.readouterr().out
    commands = [line for line in printed.splitlines() if "--module bertscale.train" in line]
    assert len(commands) == 2
    assert commands[0].startswith("PYTHONUNBUFFERED=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=")
    assert commands[0].endswith(f"--config {out / 'run_config.json'} --phase phase1")
    assert commands[1].endswith("--phase phase2")
    assert "--num_gpus 2" in commands[0] and "--resume-from" not in printed
    assert ("# phase phase1: seq_len 128, 6 steps, world size 2, micro batch 4 x accumulation 2 = global batch 16"
            in printed)
    assert "# phase phase2: seq_len 512, 3 steps, world size 2, micro batch 2 x accumulation 2 = global batch 8" \
        in printed
    resolved = json.loads(printed.split("# resolved configuration\n", 1)[1].split("\n#", 1)[0])
    assert resolved["phases"][1]["steps"] == 3 and resolved["model"]["tokenizer"] == str(data["tokenizer"])
    assert not out.exists()  # a dry run writes nothing


def test_pretrain_dry_run_with_explicit_resume(data, tmp_path, capsys):
    from bertscale.recipe import run_shape

    config = write_config(tmp_path, data, out=tmp_path / "run")
    shape = run_shape(load_config(config), "cpu", 2)
    source = make_ckpt(tmp_path / "old" / "checkpoints", 6, 0, True, model_config=shape.model_config,
                       tokenizer_fingerprint=shape.tokenizer_fingerprint, world_size=2, zero_stage=2)
    pretrain(str(config), dry_run=True, resume=str(source))
    printed = capsys.readouterr().out
    assert f"# resuming from {source} (global step 6)" in printed
    assert "# phase phase1: " in printed and "(complete: skipped)" in printed.split("# phase phase2")[0]
    phase2 = [line for line in printed.splitlines() if "--phase phase2" in line]
    assert phase2 == [line for line in printed.splitlines() if "--resume-from" in line]
    assert phase2[0].endswith(f"--phase phase2 --resume-from {source}")


def test_pretrain_dry_run_refuses_bad_preflight(data, tmp_path, capsys):
    config = write_config(tmp_path, data, out=tmp_path / "run")
    with pytest.raises(ConfigError, match="seq_len 128 but the phase trains at 512"):
        pretrain(str(config), [f"phases.phase2.data={data['d128']}"], dry_run=True)
    assert "--module" not in capsys.readouterr().out


@pytest.mark.slow
def test_an_exception_inside_pretrain_kills_its_ranks(data, tmp_path):
    """The ranks run in their own session: an exception raised in the launcher's process while it waits
    (an embedding program's, or this suite's per-test timeout) must not leave them training on."""
    import signal
    import threading

    psutil = pytest.importorskip("psutil")
    config = write_config(tmp_path, data, out=tmp_path / "run", steps=(400, 2))

    def ranks() -> list:
        alive = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if ("-m bertscale.train --local_rank" in cmd and str(tmp_path) in cmd
                    and proc.info["status"] != psutil.STATUS_ZOMBIE):
                alive.append(proc)
        return alive

    def interrupt_once_training() -> None:
        deadline = time.monotonic() + 120
        while len(ranks()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # into training
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def raise_interrupted(signum, frame):
        raise TimeoutError("interrupted by the test")

    previous = signal.signal(signal.SIGUSR1, raise_interrupted)
    try:
        threading.Thread(target=interrupt_once_training, daemon=True).start()
        with pytest.raises(TimeoutError, match="interrupted by the test"):
            pretrain(str(config))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    gone, alive = psutil.wait_procs(ranks(), timeout=10)
    assert not alive, f"ranks still running after the launcher was interrupted: {[p.pid for p in alive]}"


# ---------------------------------------------------------------- the DeepSpeed JSON, before any rank

@pytest.mark.parametrize("content, fragments", [
    (None, ["distributed.deepspeed_config:", "does not exist", "zero2.json"]),
    ('{"zero_optimization": {"stage": 2},', ["distributed.deepspeed_config:", "is not valid JSON"]),
    ('{"zero_optimization": {"stage": 2}, "train_batch_size": 64}', ["sets train_batch_size;"]),
    ('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}, "scheduler": {}}',
     ["sets optimizer, scheduler;"]),
    ('{"zero_optimization": {"stage": 4}}', ["zero_optimization.stage must be 1, 2 or 3 (got 4)"]),
    ('{"zero_optimization": {"stage": 2}, "checkpoint": {"writer": {"type": "fast"}}}', ["checkpoint.writer"]),
])
def test_dry_run_refuses_a_bad_deepspeed_json_naming_file_and_key(data, tmp_path, capsys, content, fragments):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    config = write_config(tmp_path, data, out=tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        pretrain(str(config), [f"distributed.deepspeed_config={path}"], dry_run=True)
    assert str(path) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "--module" not in capsys.readouterr().out  # stopped before planning a single rank


def test_the_default_deepspeed_json_is_found_from_another_directory(data, tmp_path, monkeypatch, capsys):
    config = run_config(tmp_path, data, out=tmp_path / "run")
    del config["distributed"]["deepspeed_config"]  # the default: ds_configs/zero2.json, relative
    monkeypatch.chdir(tmp_path)  # not the checkout
    pretrain(config, dry_run=True)
    resolved = json.loads(capsys.readouterr().out.split("# resolved configuration\n", 1)[1].split("\n#", 1)[0])
    assert resolved["distributed"]["deepspeed_config"] == str(Path(__file__).resolve().parent.parent /
                                                              "ds_configs" / "zero2.json")


# ---------------------------------------------------------------- config in code, multi-node environment, --estimate

def test_pretrain_takes_a_run_config_or_its_dict_as_well_as_a_file(data, tmp_path, capsys):
    config = run_config(tmp_path, data, out=tmp_path / "run")
    config["distributed"]["master_port"] = 29999  # the same plan from every source
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    printed = []
    for source in (str(path), config, load_config(path)):
        assert pretrain(source, ["phases.phase2.steps=3"], dry_run=True) == tmp_path / "run"
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] == printed[2]
    assert "# phase phase2: seq_len 512, 3 steps," in printed[0]
    with pytest.raises(ConfigError, match=r"given in code:\n  train.log_intervall: unknown key"):
        pretrain({**config, "train": {"log_intervall": 5}}, dry_run=True)


def test_a_hostfile_launch_refuses_auto_rather_than_decide_the_nodes_accelerator_here(data, tmp_path, capsys):
    """Launched from a CPU machine (this one), ``auto`` would have written DS_ACCELERATOR=cpu and
    OMP_NUM_THREADS=1 into the environment file every (GPU) node gets."""
    hosts = write(tmp_path / "hosts", "gpu-a slots=1\ngpu-b slots=1\n")
    config = run_config(tmp_path, data, out=tmp_path / "run")
    config["distributed"] = {**config["distributed"], "accelerator": "auto", "hostfile": str(hosts), "num_gpus": 1}
    with pytest.raises(ConfigError) as info:
        pretrain(config, dry_run=True)
    assert "distributed.accelerator is 'auto'" in str(info.value) and str(hosts) in str(info.value)
    assert "--set distributed.accelerator=cuda" in str(info.value)
    assert "--module" not in capsys.readouterr().out
    # said explicitly: the nodes' own (and so must the precision be: tests/test_precision.py)
    pretrain(config, ["distributed.accelerator=cuda", "train.precision=bf16"], dry_run=True)
    commands = [line for line in capsys.readouterr().out.splitlines() if "--module bertscale.train" in line]
    assert commands and all(c.startswith(f"PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda {deepspeed_executable()} ")
                            for c in commands)  # and no OMP_NUM_THREADS or allocator settings of this machine
    # CPU nodes: each rank counts its node's cores
    pretrain(config, ["distributed.accelerator=cpu", "train.precision=fp32"], dry_run=True)
    commands = [line for line in capsys.readouterr().out.splitlines() if "--module bertscale.train" in line]
    assert commands and not any("OMP_NUM_THREADS" in c for c in commands)


def test_the_users_deepspeed_env_is_merged_and_ours_wins_only_where_we_must(data, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    write(home / ".deepspeed_env", "# the cluster's settings\nNCCL_SOCKET_IFNAME=ib0\nLD_LIBRARY_PATH=/opt/nccl/lib\n"
                                   "OMP_NUM_THREADS=5\nDS_ACCELERATOR=cuda\n")
    write(tmp_path / ".deepspeed_env", "NCCL_SOCKET_IFNAME=eth1\n")  # the current directory's, read after
    pretrain(run_config(tmp_path, data, out=tmp_path / "run"), dry_run=True)
    printed = capsys.readouterr().out
    command = next(line for line in printed.splitlines() if "--phase phase1" in line)
    assert command.startswith("PYTHONUNBUFFERED=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=5 GLIBC_TUNABLES=")
    assert "NCCL_SOCKET_IFNAME=eth1 LD_LIBRARY_PATH=/opt/nccl/lib" in command
    assert f"# environment: merged {home / '.deepspeed_env'}" in printed
    assert "the launcher's value wins only on PYTHONUNBUFFERED, DS_ACCELERATOR" in printed
    assert "DS_ACCELERATOR=cuda of the user's file replaced by DS_ACCELERATOR=cpu" in printed
    write(home / ".deepspeed_env", "NCCL_DEBUG=INFO\nnot a variable\n")
    with pytest.raises(ConfigError, match=rf"{home / '.deepspeed_env'}:2: expected KEY=VALUE"):
        pretrain(run_config(tmp_path, data, out=tmp_path / "run"), dry_run=True)


def test_the_suite_and_what_it_starts_have_a_home_of_their_own(tmp_path, monkeypatch):
    """conftest gives the test session an empty HOME of its own, so a developer's ~/.deepspeed_env never
    reaches test ranks (tests/test_multinode.py checks that the ranks of a real launch see that HOME)."""
    assert Path.home() != Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert Path.home().is_dir() and not any(Path.home().glob(".deepspeed_env*"))
    child = subprocess.run([sys.executable, "-c", "import pathlib; print(pathlib.Path.home())"], capture_output=True,
                           text=True, check=True)
    assert child.stdout.strip() == str(Path.home())
    monkeypatch.chdir(tmp_path)
    assert user_env_files() == []  # what the launcher would merge into the ranks' environment: nothing


def test_dry_run_estimate_times_a_real_step_per_phase(data, tmp_path, capsys):
    config = run_config(tmp_path, data, out=tmp_path / "run", steps=(600, 40))
    pretrain(config, dry_run=True, estimate=True)
    printed = capsys.readouterr().out
    lines = printed.split("# estimated time per phase (--estimate)", 1)[1].splitlines()
    phase1 = next(line for line in lines if line.startswith("#   phase1: about "))
    assert "600 steps x (2 micro batch(es) of 4 of its samples (seq_len 128) x " in phase1 and "2 rank(s) in parallel" in phase1
    assert "#   phase2: about " in printed and "40 steps x (2 micro batch(es) of 2 of its samples (seq_len 512)" in printed
    seconds = [float(x) for x in re.findall(r"x ([0-9.]+) s forward\+backward", printed)]
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert "An estimate" in printed and "data loading" in printed and "communication" in printed
    assert not (tmp_path / "run").exists()  # measured in this process; nothing written, no rank started


def test_estimate_times_micro_batches_in_the_layout_training_uses(data, tmp_path):
    """train.unpadded (the default) trains on unpadded micro batches: --estimate times those, not padded ones."""
    from bertscale.packing import real_tokens
    from launcher.dry_run import estimate_batch
    from launcher.launch import resolve_config

    config = run_config(tmp_path, data, out=tmp_path / "run")
    config["phases"][1]["micro_batch"] = 4  # several samples of several lengths at 512
    unpadded = estimate_batch(cfg := resolve_config(config), cfg.phases[1])
    padded = estimate_batch(cfg := resolve_config(config, ["train.unpadded=false"]), cfg.phases[1])
    assert "cu_seqlens" in unpadded and "attention_mask" in padded
    assert len(unpadded["next_sentence_label"]) == len(padded["next_sentence_label"]) == 4  # the same samples
    assert unpadded["input_ids"].numel() == real_tokens(padded) < padded["input_ids"].numel()


def test_slurm_script_needs_its_environment_named_and_stops_gracefully(tmp_path):
    """The activation is not commented out: without BERTSCALE_VENV the job fails at once, saying what to set."""
    script = Path(__file__).resolve().parent.parent / "launcher" / "slurm.sbatch"
    env = {k: v for k, v in os.environ.items() if k != "BERTSCALE_VENV"}
    result = subprocess.run(["bash", str(script), "run.toml"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "BERTSCALE_VENV is not set" in result.stderr
    result = subprocess.run(["bash", str(script), "run.toml"], env={**env, "BERTSCALE_VENV": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"BERTSCALE_VENV={tmp_path} has no bin/activate" in result.stderr
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives and "#SBATCH --signal=B:TERM@120" in directives
