"""The sandbox stops what generated code can do wrong, each within its limit, and runs nothing unless enabled."""
import os
import socket
import textwrap
import time

import pytest

from semalign_ds import sandbox
from semalign_ds.sandbox import Limits, run_program
from tests.helpers import processes_with

pytestmark = pytest.mark.sandbox  # every test here runs programs isolated


def run(code, **limits):
    return run_program(textwrap.dedent(code), Limits(**limits), allow=True)


def test_refused_unless_enabled(monkeypatch):
    monkeypatch.delenv(sandbox.ENV_FLAG, raising=False)
    with pytest.raises(sandbox.ExecutionNotAllowed, match=f"--allow-code-execution.*{sandbox.ENV_FLAG}=1"):
        run_program("print(1)")
    monkeypatch.setenv(sandbox.ENV_FLAG, "1")
    assert run_program("print(1)").passed


def test_exit_status_and_output():
    ok = run("print('hello')")
    assert ok.passed and ok.stdout == "hello\n" and ok.returncode == 0
    bad = run("assert 1 == 2, 'wrong'")
    assert bad.status == "failed" and bad.reason == "AssertionError: wrong"
    assert run("import sys; sys.exit(3)").returncode == 3


def test_runs_in_a_fresh_temporary_directory_removed_afterwards():
    res = run("import os; open('scratch.txt', 'w').write('x'); print(os.getcwd())")
    workdir = res.stdout.strip()
    assert res.passed and os.path.basename(workdir).startswith("semalign-sandbox-")
    assert workdir != os.getcwd() and not os.path.exists(workdir)


def test_infinite_loop_times_out():
    res = run("while True:\n    pass", timeout=1.0, cpu_seconds=30)
    assert res.status == "timeout" and 1.0 <= res.seconds < 2.5


def test_cpu_limit_kills_a_busy_program():
    res = run("while True:\n    pass", timeout=20, cpu_seconds=1)
    assert res.status == "failed" and res.reason in ("killed by SIGXCPU", "killed by SIGKILL")
    assert res.seconds < 5


def test_huge_allocation_fails_within_the_memory_limit():
    res = run("x = bytearray(8 * 1024 ** 3)\nprint('allocated')", memory_mb=512, timeout=10)
    assert res.status == "failed" and "MemoryError" in res.reason and res.seconds < 5
    # growing step by step also stops at the limit
    res = run("""
        blocks = []
        while True:
            blocks.append(bytearray(32 * 1024 ** 2))
        """, memory_mb=512, timeout=10)
    assert res.status == "failed" and "MemoryError" in res.reason and res.seconds < 5


def test_large_write_stops_at_the_file_size_limit():
    res = run("""
        import os
        with open('big.bin', 'wb') as f:
            for _ in range(64):
                f.write(b'x' * 1024 ** 2)
                f.flush()
        """, file_size_mb=2, timeout=10)
    assert res.status == "failed" and ("File too large" in res.reason or "SIGXFSZ" in res.reason)
    assert res.seconds < 5


CHILD = """
    import subprocess, sys
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)  # {token}'],
                             start_new_session={escape})
    print('started', child.pid, flush=True)
    """


@pytest.mark.parametrize("then", ["loop", "exit"])
@pytest.mark.parametrize("escape", [False, True])
def test_children_end_with_the_program(then, escape):
    """The program starts a child (in its own session too) that would sleep 30 s; none is left afterwards."""
    token = f"semalign-child-{os.getpid()}-{time.monotonic_ns()}"
    code = textwrap.dedent(CHILD.format(token=token, escape=escape))
    code += "while True:\n    pass\n" if then == "loop" else ""
    res = run(code, timeout=2.0, cpu_seconds=30)
    assert res.status == ("timeout" if then == "loop" else "passed"), res
    assert res.stdout.startswith("started ")
    deadline = time.monotonic() + 2.0
    while processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(token) == []


def test_no_network():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        res = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert res.status == "failed" and "network access is disabled" in res.reason
        res = run("import socket\nsocket.socket(socket.AF_INET6, socket.SOCK_DGRAM)")
        assert res.status == "failed" and "network access is disabled" in res.reason
        # local pipes still work (asyncio needs socketpair)
        assert run("import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'").passed
        # going around the patch through _socket meets an empty network namespace
        res = run(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))")
        assert res.status == "failed" and "Errno" in res.reason
    finally:
        server.close()


def test_many_programs_keep_their_order():
    results = sandbox.run_many([f"import sys; sys.exit({i % 2})" for i in range(6)], Limits(timeout=10),
                               allow=True, workers=3)
    assert [r.passed for r in results] == [True, False] * 3
