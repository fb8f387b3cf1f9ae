"""Hostile programs, run as the CI user (root here), are contained: each prints what its attempt met, and the test
checks on the host side that nothing was reached. Only canary processes the tests start are ever signalled."""
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest

from semalign_ds import sandbox
from semalign_ds.sandbox import Limits, run_program
from tests.helpers import processes_with

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code, **limits):
    return run_program(textwrap.dedent(code), Limits(**limits), allow=True)


def lines(res):
    return res.stdout.splitlines()


@pytest.fixture
def canary():
    """A `sleep` process of the test's own, with a secret in its environment."""
    secret = secrets.token_hex(16)
    proc = subprocess.Popen(["sleep", "120"], env={"PATH": os.environ["PATH"], "CANARY_SECRET": secret})
    yield proc, secret
    proc.kill()
    proc.wait()


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    yield server
    server.close()


def accepted(server):
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@pytest.mark.sandbox
def test_runs_unprivileged_in_namespaces_of_its_own(monkeypatch):
    monkeypatch.setenv("SEMALIGN_TEST_TOKEN", "inherited")
    res = run("""
        import os
        status = dict(l.split(':', 1) for l in open('/proc/self/status'))
        print(os.getuid(), os.getgid(), status['CapEff'].strip(), status['CapBnd'].strip())
        print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
        print(sorted(os.listdir('/')))
        print(sorted(os.environ.items()))
        for attempt in (lambda: os.setuid(0), lambda: os.chroot('/tmp')):
            try:
                attempt()
                print('ESCALATED')
            except OSError as err:  # EPERM, or EINVAL: uid 0 does not exist in its namespace
                print('BLOCKED', err.errno in (1, 22))
        """)
    assert res.passed, res
    ids, pids, top, env, *blocked = lines(res)
    assert ids == f"{sandbox.NOBODY} {sandbox.NOBODY} 0000000000000000 0000000000000000"
    assert eval(pids) == [1, 2]  # bwrap's init and the program: no host process is visible
    assert set(eval(top)) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "dev", "tmp",
                              *{p.strip("/").split("/")[0] for p in sandbox.interpreter()[1]}}
    assert "inherited" not in env and {k for k, _ in eval(env)} <= {
        "PATH", "HOME", "TMPDIR", "LANG", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE", "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PWD"}
    assert blocked == ["BLOCKED True", "BLOCKED True"]


@pytest.mark.sandbox
def test_standard_library_program_works():
    res = run("""
        import collections, hashlib, itertools, json, math, re, statistics, fractions, heapq, string
        print(hashlib.md5(b'x').hexdigest(), math.comb(7, 3), json.dumps(sorted(collections.Counter('abca'))))
        """)
    assert res.passed and res.stdout.split() == ["9dd4e461268c8034f5c8564e155c67a6", "35", '["a",', '"b",', '"c"]']


@pytest.mark.sandbox
def test_no_network_through_setns_into_another_namespace(canary, listener):
    """setns() into the canary's (host) network namespace through /proc, then reach a host TCP listener."""
    proc, _ = canary
    port = listener.getsockname()[1]
    res = run(f"""
        import ctypes, os, _socket
        libc = ctypes.CDLL(None, use_errno=True)
        for target in ('/proc/{proc.pid}/ns/net', '/proc/1/ns/net'):
            try:
                fd = os.open(target, os.O_RDONLY)
            except OSError as err:
                print('BLOCKED open', target, err.errno)
                continue
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                print('BLOCKED setns', target, ctypes.get_errno())
            else:
                print('SETNS', target)
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(('127.0.0.1', {port}))
            print('CONNECTED')
        except OSError as err:
            print('BLOCKED connect', err.errno)
        """)
    assert res.passed, res
    got = lines(res)
    assert got[0].startswith(f"BLOCKED open /proc/{proc.pid}/ns/net")  # the canary is not in its /proc
    assert got[1].startswith("BLOCKED setns /proc/1/ns/net")  # no capability for its own init's either
    assert got[2].startswith("BLOCKED connect") and not accepted(listener)


@pytest.mark.sandbox
def test_no_host_unix_sockets(tmp_path):
    """A socket file in a host temp folder, and an abstract socket, are both out of reach."""
    path = str(tmp_path / "host.sock")
    abstract = "\0semalign-test-" + secrets.token_hex(8)
    servers = []
    for address in (path, abstract):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(4)
        server.setblocking(False)
        servers.append(server)
    try:
        res = run(f"""
            import socket
            for address in ({path!r}, {abstract!r}):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(address)
                    print('CONNECTED')
                except OSError as err:
                    print('BLOCKED', type(err).__name__)
            """)
        assert res.passed and lines(res) == ["BLOCKED FileNotFoundError", "BLOCKED ConnectionRefusedError"], res
        assert not any(accepted(s) for s in servers)
    finally:
        for s in servers:
            s.close()


@pytest.mark.sandbox
def test_cannot_read_other_processes_or_host_files(canary, tmp_path, monkeypatch):
    proc, secret = canary
    monkeypatch.setenv("SEMALIGN_TEST_TOKEN", secret)  # the evaluating process's own environment
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    res = run(f"""
        import os
        for path in ('/proc/{proc.pid}/environ', {str(secret_file)!r}, {os.path.join(REPO, 'README.md')!r},
                     '/etc/shadow', '/root/.bash_history'):
            try:
                print('READ', open(path, 'rb').read()[:40])
            except OSError as err:
                print('BLOCKED', type(err).__name__)
        found = []
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                found.append({secret!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read())
            except OSError:
                pass
        print('LEAKED' if any(found) or {secret!r} in str(os.environ) else 'NOLEAK')
        """)
    assert res.passed, res
    assert lines(res) == ["BLOCKED FileNotFoundError"] * 5 + ["NOLEAK"]
    assert secret not in res.stdout + res.stderr


@pytest.mark.sandbox
def test_cannot_write_outside_its_folder(tmp_path):
    name = "semalign-hostile-" + secrets.token_hex(6)
    site = sysconfig.get_paths()["purelib"]
    targets = [f"/dev/shm/{name}", f"/tmp/{name}", os.path.join(site, name + ".pth"), os.path.join(REPO, name),
               str(tmp_path / name), os.path.join(sandbox.interpreter()[1][0], name)]
    res = run(f"""
        for path in {targets!r}:
            try:
                open(path, 'w').write('import os')
                print('WROTE inside only' if path.startswith(('/tmp/', '/dev/shm/')) else 'WROTE')
            except OSError as err:
                print('BLOCKED', type(err).__name__)
        """)
    assert res.passed, res
    # /tmp and /dev/shm are its own tmpfs; the rest is absent or read-only
    assert lines(res)[:2] == ["WROTE inside only"] * 2 and all(l.startswith("BLOCKED") for l in lines(res)[2:])
    assert not any(os.path.exists(t) for t in targets)


@pytest.mark.sandbox
def test_cannot_signal_a_process_outside(canary):
    proc, _ = canary
    res = run(f"""
        import os, signal
        try:
            os.kill({proc.pid}, signal.SIGKILL)
            print('SIGNALLED')
        except OSError as err:
            print('BLOCKED', type(err).__name__)
        """)
    assert res.passed and lines(res) == ["BLOCKED ProcessLookupError"], res
    time.sleep(0.2)
    assert proc.poll() is None


@pytest.mark.sandbox
def test_fork_loop_is_bounded_and_leaves_nothing():
    """Children that sleep, forked until refused, then a fork bomb: the process limit holds, the time limit ends
    it, and no process is left (the program's path, in every child's command line, finds them on the host)."""
    res = run("""
        import os, time
        print(os.getcwd(), flush=True)
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
        except BlockingIOError:
            print('BLOCKED after', n, flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, timeout=3, cpu_seconds=30, max_processes=24)
    assert res.status == "timeout" and res.seconds < 6, res
    workdir, blocked = lines(res)[:2]
    assert blocked.startswith("BLOCKED after") and int(blocked.split()[-1]) < 24
    assert workdir.startswith("/tmp/semalign-sandbox-")
    deadline = time.monotonic() + 2
    while processes_with(workdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(workdir) == []


@pytest.mark.sandbox
def test_huge_output_is_capped():
    res = run("""
        import sys
        block = 'x' * (1 << 20)
        for _ in range(512):
            sys.stdout.write(block)
            sys.stderr.write(block)
        print('END', flush=True)
        """, timeout=20)
    assert res.passed, res.reason
    for text in (res.stdout, res.stderr):
        assert text == "x" * sandbox.OUTPUT_LIMIT + "...[truncated]"


def test_refused_where_no_isolation_can_be_had(monkeypatch):
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.delenv(sandbox.UNISOLATED_FLAG, raising=False)
    with pytest.raises(sandbox.IsolationUnavailable,
                       match="nonexistent/bwrap.*not found.*apt-get install bubblewrap.*--allow-unisolated"):
        run_program("print(1)", allow=True)
    with pytest.raises(sandbox.IsolationUnavailable):
        sandbox.run_many(["print(1)"], allow=True)
    # bwrap present but failing its self-test
    monkeypatch.setenv(sandbox.BWRAP_ENV, "false")
    with pytest.raises(sandbox.IsolationUnavailable, match="Code cannot run isolated"):
        sandbox.require_execution(True, "humaneval")


def test_launcher_refuses_without_isolation_and_says_how(monkeypatch, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_launcher", os.path.join(REPO, "launchers", "evaluate.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.setenv(sandbox.UNISOLATED_FLAG, "0")  # restored afterwards, though the launcher sets it
    argv = ["--model", "m=/nonexistent/model", "--benchmarks", "humaneval", "--allow-code-execution",
            "--output-dir", str(tmp_path / "out")]
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err
    assert "Code cannot run isolated" in err and "pass --allow-unisolated-execution" in err
    # accepted: then refused only as root where uid 65534 cannot run the interpreter, else the next check speaks
    assert launcher.main(argv + ["--allow-unisolated-execution"]) == 2
    err = capsys.readouterr().err
    assert os.environ[sandbox.UNISOLATED_FLAG] == "1" and "pass --allow-unisolated-execution" not in err
    assert "never runs as root" in err or "/nonexistent/model" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the drop to an unprivileged uid happens for root only")
def test_unisolated_as_root_never_runs_as_root(monkeypatch, canary, tmp_path):
    """Accepted unisolated runs as root drop to uid 65534: the canary (root's) cannot be signalled. Where the
    interpreter is not usable by that uid, running is refused even with the flag."""
    proc, _ = canary
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.setattr(sandbox, "_PROBES", {})
    code = f"import os, signal\nprint(os.getuid())\nos.kill({proc.pid}, signal.SIGKILL)"
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs a system /usr/bin/python3 that uid 65534 can run")
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    res = run_program(code, Limits(timeout=10), allow=True, unisolated=True)
    assert res.status == "failed" and "PermissionError" in res.reason, res
    assert res.stdout.strip() == str(sandbox.NOBODY) and proc.poll() is None
    # an interpreter only root can reach (like one under /root): refused even with the flag
    monkeypatch.setattr(sandbox, "_PROBES", {})
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copy(os.path.realpath("/usr/bin/python3"), private / "python3")
    monkeypatch.setattr(sys, "executable", str(private / "python3"))
    with pytest.raises(sandbox.IsolationUnavailable, match="never runs as root"):
        run_program(code, allow=True, unisolated=True)
    assert proc.poll() is None
