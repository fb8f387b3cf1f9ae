"""benchmarks/lockstep.py: its speed-up arithmetic, and the committed table agreeing with its own seconds."""
import importlib.util
import os
import re

from tests.helpers import ROOT


def _lockstep():
    spec = importlib.util.spec_from_file_location("lockstep", os.path.join(ROOT, "benchmarks", "lockstep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _speedups(lines):
    rows = [line.split("|")[1:-1] for line in lines if re.match(r"\| \d", line)]
    return [(int(w), mode.strip(), [float(x) for x in secs.split("/")], float(up.strip().rstrip("x")))
            for w, mode, secs, up in rows]


def test_speedup_is_world_times_alone_over_the_slower_rank():
    rows = [(1, "alone", [61.37]), (2, "free", [63.9, 65.3]), (2, "gathered", [70.1, 69.2])]
    got = {mode: up for _, mode, _, up in _speedups(_lockstep().table(rows))}
    assert got == {"alone": 1.0, "free": round(2 * 61.37 / 65.3, 2), "gathered": round(2 * 61.37 / 70.1, 2)}


def test_upper_median_of_the_timed_forwards(monkeypatch):
    lockstep = _lockstep()
    clock = {"now": 0.0}
    durations = iter([9.0, 3.0, 1.0, 0.5, 2.0])  # a warm-up of 9 s, then four timed forwards

    class Model:  # a forward takes the next duration of the clock below
        def __call__(self, ids):
            clock["now"] += next(durations)

    monkeypatch.setattr(lockstep.time, "perf_counter", lambda: clock["now"])
    assert lockstep._forward_seconds(Model(), None, 4) == 2.0  # of 0.5, 1, 2, 3: the upper median


def test_the_committed_table_agrees_with_its_seconds():
    with open(os.path.join(ROOT, "benchmarks", "lockstep.md")) as f:
        lines = f.read().splitlines()
    rows = _speedups(lines)
    assert [r[1] for r in rows][:2] == ["alone", "free"] and len(rows) >= 4
    alone = rows[0][2][0]
    for world, mode, seconds, up in rows:
        assert len(seconds) == world, mode
        assert abs(up - world * alone / max(seconds)) <= 0.006, (mode, up)
