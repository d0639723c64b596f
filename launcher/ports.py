"""The rendezvous port: a free one picked per single-node run (like torchrun --standalone), or the
configured one checked before any rank starts."""

from __future__ import annotations

import socket

from bertscale.config import ConfigError, RunConfig

DEFAULT_MASTER_PORT = 29500
"""The rendezvous port of a multi-node run whose configuration names none (DeepSpeed's and torch's default):
every node must agree on it, so it cannot be picked per node the way a single-node run picks one."""


def standalone(cfg: RunConfig) -> bool:
    """A single-node run that hosts its own rendezvous (no hostfile, no --no_ssh): like torchrun
    --standalone, it may pick its master port itself."""
    d = cfg.distributed
    return not d.hostfile and not d.no_ssh and d.num_nodes == 1


def free_port() -> int:
    """A TCP port no process holds right now (the OS picks it); another may take it before rank 0 listens,
    which the launcher notices and retries once (``_run_phases``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def pick_port(cfg: RunConfig) -> int | None:
    """A free master port for a standalone run whose configuration names none, else None (the configured
    port, or DEFAULT_MASTER_PORT for many nodes)."""
    return free_port() if cfg.distributed.master_port is None and standalone(cfg) else None


def check_port(cfg: RunConfig) -> None:
    """On the node that hosts the rendezvous, refuse a master port another process holds."""
    d = cfg.distributed
    hosts_rendezvous = (d.node_rank in (None, 0)) and (not d.hostfile or d.no_ssh)
    if not hosts_rendezvous:
        return
    port = d.master_port or DEFAULT_MASTER_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the rendezvous store: TIME_WAIT is fine
        try:
            sock.bind(("", port))
        except OSError:
            hint = (" or leave it unset: a single-node run then picks a free port itself" if standalone(cfg) else "")
            raise ConfigError(f"distributed.master_port {port} is in use on this machine (another run?); "
                              f"pick a free one, e.g. --set distributed.master_port={port + 1}{hint}") from None
