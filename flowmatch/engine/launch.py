"""Where this process sits in the job, read from whichever launcher started it, and the rendezvous of its ranks.

Launchers and what they leave in the environment:

- ``torchrun`` (single node, or ``--nnodes N`` with a c10d rendezvous) and the ``deepspeed`` launcher (``--num_gpus``,
  ``--hostfile``, ``--no_ssh --node_rank``): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. The
  deepspeed launcher also passes ``--local_rank=N`` on the command line, which the CLI takes (flowmatch.cli).
- SLURM ``srun``: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and SLURM_JOB_NODELIST (or SLURM_NODELIST). The master
  is the first host of the node list and the port MASTER_PORT when set, else ``SLURM_PORT_BASE + job id % 10000``
  (the same on every task of a job, different across jobs).
- nothing: a plain ``python`` process, a one-process group on a free local port.

Without torchrun's agent (which runs its own rendezvous with its own timeouts), rank 0 hosts the rendezvous store
itself: a port already in use and ranks that never arrive within ``distributed.rendezvous_timeout_s`` are errors
that say so, instead of a hang until the collective timeout.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from flowmatch.errors import UsageError

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_PORT_BASE = 20000
_JOINED = "flowmatch/rendezvous/joined/"
_ALL_JOINED = "flowmatch/rendezvous/complete"
_POLL_S = 0.2


class LaunchError(RuntimeError, UsageError):
    """The job was launched in a way that cannot work; the message says what to change."""


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """torchrun, env (RANK/WORLD_SIZE set by another launcher, e.g. deepspeed), slurm or single."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    if not value.strip().isdigit():
        raise LaunchError(f"{key}={value!r} in the environment is not a non-negative integer")
    return int(value)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    entry = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", entry)
    if match is None:
        if not entry or "[" in entry or "]" in entry:
            raise LaunchError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node")
        return entry
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def detect_launch(environ: Mapping[str, str]) -> LaunchInfo:
    """Read the launcher's variables (see the module docstring); LaunchError when they are incomplete."""
    if any(k in environ for k in ("RANK", "WORLD_SIZE")):
        missing = [k for k in ENV_KEYS if k not in environ]
        if missing:
            raise LaunchError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} are not: launch with torchrun, the "
                              "deepspeed launcher or srun, or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "env"
        info = LaunchInfo(_int(environ, "RANK"), _int(environ, "WORLD_SIZE"),
                          _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0, environ["MASTER_ADDR"],
                          _int(environ, "MASTER_PORT"), launcher)
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        world = _int(environ, "SLURM_NTASKS")
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
        if "MASTER_PORT" in environ:
            port = _int(environ, "MASTER_PORT")
        elif world > 1:
            port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % 10000 if "SLURM_JOB_ID" in environ else 29500
        else:
            port = _free_port()
        info = LaunchInfo(_int(environ, "SLURM_PROCID"), world,
                          _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
                          environ.get("MASTER_ADDR") or first_host(nodelist), port, "slurm")
    else:
        return LaunchInfo(0, 1, 0, "127.0.0.1", _free_port(), "single")
    if info.world_size < 1 or info.rank >= info.world_size:
        raise LaunchError(f"rank {info.rank} of a world of {info.world_size} processes does not exist: check the "
                          "launcher's process counts")
    return info


def export(info: LaunchInfo, environ: os._Environ | dict) -> list[str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT where missing (DeepSpeed and child processes
    read them); returns the keys it set, for restoring the environment later."""
    values = {"RANK": info.rank, "WORLD_SIZE": info.world_size, "LOCAL_RANK": info.local_rank,
              "MASTER_ADDR": info.master_addr, "MASTER_PORT": info.master_port}
    added = [k for k in values if k not in environ]
    for key in added:
        environ[key] = str(values[key])
    return added


def _open_store(info: LaunchInfo, timeout_s: float) -> tuple[dist.Store | None, str]:
    """(the store, "") or (None, why). Opened in a thread with a deadline: a client that reaches a port some
    other program listens on can wait for the store's handshake forever."""
    box: dict[str, object] = {}

    def connect() -> None:
        try:
            box["store"] = dist.TCPStore(info.master_addr, info.master_port, info.world_size,
                                         is_master=info.rank == 0, timeout=timedelta(seconds=timeout_s),
                                         wait_for_workers=False)
        except (RuntimeError, OSError) as err:
            box["error"] = str(err)

    thread = threading.Thread(target=connect, name="flowmatch-rendezvous", daemon=True)
    thread.start()
    thread.join(timeout_s + 5 * _POLL_S)
    if "store" in box:
        return box["store"], ""  # type: ignore[return-value]
    return None, str(box.get("error", "no answer"))


def rendezvous(info: LaunchInfo, timeout_s: float) -> dist.Store:
    """Collective: every rank joins rank 0's store within ``timeout_s``; the store to build the group on.

    LaunchError when rank 0 cannot listen on the port, when a rank cannot reach rank 0, or when ranks are missing
    at the deadline (rank 0 names them; the others learn that the job did not start).
    """
    where = f"{info.master_addr}:{info.master_port}"
    store, failure = _open_store(info, timeout_s)
    if store is None:
        if info.rank == 0:
            raise LaunchError(f"rank 0 cannot host the rendezvous on {where} ({failure}): the port is probably in "
                              "use; choose another with --master_port (torchrun, deepspeed) or MASTER_PORT")
        raise LaunchError(f"rank {info.rank} could not reach rank 0's rendezvous at {where} within {timeout_s:g} s "
                          f"({failure}): is the first node started, with the same master address and port, and is "
                          "that port free?")
    store.set(f"{_JOINED}{info.rank}", "1")
    deadline = time.monotonic() + timeout_s
    if info.rank == 0:
        keys = [f"{_JOINED}{r}" for r in range(info.world_size)]
        while True:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            if not missing:
                store.set(_ALL_JOINED, "ok")
                return store
            if time.monotonic() > deadline:
                store.set(_ALL_JOINED, "missing " + ",".join(map(str, missing)))
                raise LaunchError(f"rank(s) {', '.join(map(str, missing))} of {info.world_size} did not join the "
                                  f"rendezvous at {where} within {timeout_s:g} s "
                                  "(distributed.rendezvous_timeout_s): start every node of the job")
            time.sleep(_POLL_S)
    while not store.check([_ALL_JOINED]):
        if time.monotonic() > deadline + 5 * _POLL_S:
            raise LaunchError(f"rank {info.rank}: the job at {where} did not start within {timeout_s:g} s")
        time.sleep(_POLL_S)
    outcome = store.get(_ALL_JOINED).decode()
    if outcome != "ok":
        raise LaunchError(f"rank {info.rank}: the job at {where} did not start: rank(s) "
                          f"{outcome.removeprefix('missing ')} never joined")
    return store
