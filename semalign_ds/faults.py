"""Fault injection for the resume and fault-tolerance tests: SEMALIGN_DS_FAULT="NAME:N[:RANK[:raise]]" sends
SIGKILL to this process the N-th time it passes point NAME (on rank RANK; "*" or no RANK: every rank), or with
":raise" raises an error there instead (a failing rank), with ":usr1" sends itself SIGUSR1 (a stop request), or with
":sleep" pauses there for 45 seconds (a run still busy when another one starts). Points: cache_shard (after a
cache shard is written), stage_step (after an optimizer step), checkpoint_saved (every rank's checkpoint files
written, the pointer not yet moved)."""
from __future__ import annotations

import os
import signal
import time

_COUNTS = {}


def fault_point(name, rank):
    spec = os.environ.get("SEMALIGN_DS_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != name or (len(parts) > 2 and parts[2] != "*" and int(parts[2]) != rank):
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] == int(parts[1]):
        if len(parts) > 3 and parts[3] == "raise":
            raise RuntimeError(f"injected fault at {name} #{parts[1]} on rank {rank}")
        if len(parts) > 3 and parts[3] == "sleep":
            time.sleep(45)
            return
        if len(parts) > 3 and parts[3] == "usr1":
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        os.kill(os.getpid(), signal.SIGKILL)
