"""bertscale.files: atomic writes and the exclusive lock."""

import os
import subprocess
import sys
import textwrap

import pytest

from bertscale.files import ExclusiveLock, LockedError, atomic_output, write_atomic


def test_write_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, "old\n")
    write_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_written_files_follow_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "x", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o644


def _safetensors_under_umask(path, mask: int) -> int:
    """Save a safetensors file through atomic_output under ``mask``; its permission bits."""
    from safetensors.torch import save_file
    import torch

    old = os.umask(mask)
    try:
        with atomic_output(path) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    return path.stat().st_mode & 0o777


def test_files_a_writer_makes_private_become_group_readable(tmp_path):
    """safetensors creates its file 0600 (model.safetensors was unreadable to the group); atomic_output gives
    it the umask's permissions, and a private umask stays private."""
    assert _safetensors_under_umask(tmp_path / "model.safetensors", 0o022) == 0o644
    assert _safetensors_under_umask(tmp_path / "private.safetensors", 0o077) == 0o600


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_an_os_error_names_the_file(tmp_path):
    with pytest.raises(OSError, match="missing-dir/f"):
        write_atomic(tmp_path / "missing-dir" / "f", "x")


def test_a_second_process_is_refused_naming_the_owner_and_a_dead_owner_leaves_nothing_stuck(tmp_path):
    lock_file = tmp_path / "run.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from bertscale.files import ExclusiveLock
            ExclusiveLock({str(lock_file)!r}, "run").acquire()
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            ExclusiveLock(lock_file, "run directory X").acquire()
    finally:
        holder.kill()
        holder.wait()
    with ExclusiveLock(lock_file, "run directory X"):  # the kernel released the dead owner's lock
        pass
