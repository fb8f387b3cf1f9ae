"""Run untrusted generated code (HumanEval/MBPP programs) isolated by bubblewrap, with limits.

What a program gets (`bwrap`, https://github.com/containers/bubblewrap, Debian package `bubblewrap`):
- no privileges over the host: a new user namespace in which it is uid/gid 65534 with no capabilities. As root,
  bwrap itself runs as uid 65534 on the host too (a private mount namespace first makes the folders it binds
  reachable for that uid, see isolated_command): the kernel exempts host root from RLIMIT_NPROC even inside a
  user namespace, and fork loops must stay bounded. RLIMIT_NPROC then counts only the program's own processes;
- new network (loopback only, down: no host listener, no abstract Unix socket), PID (its own /proc: no other
  process can be seen, signalled or read), mount, IPC, UTS and cgroup namespaces; `--new-session` (no terminal
  injection) and `--die-with-parent`;
- a file system of its own: /usr, the /bin and /lib links and the interpreter's prefixes read-only; fresh tmpfs
  over /tmp and /dev/shm; a minimal /dev; its own temporary working directory (also HOME and TMPDIR) the only host
  folder it can write, removed afterwards. Nothing else of the host is there: not /run, /root, /home, the project
  checkout, the virtual environment or any host socket file (a read-only bind would not stop connect() on those);
- an environment of its own (no variable is inherited, so tokens do not leak);
- resource limits set before the program runs: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_CORE = 0, RLIMIT_NPROC;
  a wall-clock timeout after which (and after every run) the whole process group is killed, which ends the PID
  namespace and every process in it; stdout and stderr read through pipes, keeping the first OUTPUT_LIMIT
  characters (the rest is drained and dropped, so huge output fills neither memory nor disk).

Where bwrap is missing or fails its self-test (e.g. user namespaces disabled), code execution is refused
(IsolationUnavailable says what is missing and how to get it) unless the caller accepts running unisolated:
`unisolated=True` (the launchers' --allow-unisolated-execution) or SEMALIGN_DS_ALLOW_UNISOLATED_EXECUTION=1. Then
the program runs with the limits only, and with `socket` patched to refuse network (best effort). Root is never
handed to unisolated code: as root it runs as uid/gid 65534, which cannot signal or write to root's processes and
files; if the interpreter cannot run as that user (e.g. it lives under /root), execution is refused even with the
flag.

Code runs only when execution is enabled explicitly: `allow=True` (the launchers' --allow-code-execution) or
SEMALIGN_DS_ALLOW_CODE_EXECUTION=1; otherwise ExecutionNotAllowed says how to enable it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from semalign_ds.config import ConfigError

ENV_FLAG = "SEMALIGN_DS_ALLOW_CODE_EXECUTION"
UNISOLATED_FLAG = "SEMALIGN_DS_ALLOW_UNISOLATED_EXECUTION"
BWRAP_ENV = "SEMALIGN_DS_BWRAP"  # the bwrap executable (a path or a name on PATH); default "bwrap"
OUTPUT_LIMIT = 4096  # characters of stdout/stderr kept in a Result
NOBODY = 65534       # the uid/gid programs run as
_YES = ("1", "true", "yes")


class ExecutionNotAllowed(ConfigError):
    pass


class IsolationUnavailable(ExecutionNotAllowed):
    pass


def execution_allowed(allow: bool = False) -> bool:
    return bool(allow) or os.environ.get(ENV_FLAG, "") in _YES


def unisolated_allowed(unisolated: bool = False) -> bool:
    return bool(unisolated) or os.environ.get(UNISOLATED_FLAG, "") in _YES


def require_execution(allow: bool = False, what="this evaluation", unisolated: bool = False) -> str | None:
    """Refuse unless code execution was enabled and can be isolated (or running unisolated was accepted); the
    message says how to enable it. Returns the bwrap to isolate with (None: unisolated). Cheap after the first
    call: the isolation probe is cached."""
    if not execution_allowed(allow):
        raise ExecutionNotAllowed(
            f"{what} runs model-generated code. It runs isolated by bubblewrap (no network, no host files or "
            f"processes, no privileges; semalign_ds/sandbox.py) with time, memory and file-size limits. Enable it "
            f"explicitly with --allow-code-execution (or {ENV_FLAG}=1)")
    return _launcher(unisolated)


@dataclass
class Limits:
    timeout: float = 10.0       # wall-clock seconds for the whole process group
    cpu_seconds: int | None = None  # RLIMIT_CPU; default: ceil(timeout) + 1
    memory_mb: int = 2048       # RLIMIT_AS
    file_size_mb: int = 16      # RLIMIT_FSIZE: the largest file the program may write
    max_processes: int = 32     # RLIMIT_NPROC: processes and threads the program may have at once
    network: bool = False       # True shares the host's network (isolated runs) / leaves `socket` alone


@dataclass
class Result:
    status: str        # "passed" (exit 0), "failed" (non-zero exit or killed by a signal) or "timeout"
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    reason: str = ""   # e.g. "killed by SIGXFSZ", "MemoryError", "timed out after 3.0 s"

    @property
    def passed(self):
        return self.status == "passed"

    def to_dict(self):
        return asdict(self)


# The child's first code: limits, no network, then the program as __main__. argv: limits JSON, program path.
_PREAMBLE = r"""
import json, os, resource, socket, sys
limits = json.loads(sys.argv[1])
for name, value in limits["rlimits"].items():
    value = int(value)
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError) as err:
        sys.stderr.write(f"sandbox: could not set {name}={value}: {err}\n")
if not limits["network"]:
    class _NoNetworkSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family != socket.AF_UNIX:
                raise PermissionError("network access is disabled in the sandbox")
            super().__init__(family, type, proto, fileno)
    def _refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
    socket.socket = socket.SocketType = _NoNetworkSocket
    socket.create_connection = socket.create_server = socket.getaddrinfo = socket.gethostbyname = _refuse
program = sys.argv[2]
sys.argv = [program]
sys.path.insert(0, os.path.dirname(program))
import runpy
runpy.run_path(program, run_name="__main__")
"""


def interpreter() -> tuple[str, list[str]]:
    """The Python that runs programs (sys.executable's real file: for a symlinked virtual environment, its base
    interpreter, which sees the standard library only) and the folders it needs, outermost only."""
    exe = os.path.realpath(sys.executable)
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    if os.path.commonpath([exe, os.path.realpath(sys.prefix)]) == os.path.realpath(sys.prefix):
        roots.add(os.path.realpath(sys.prefix))  # a copied (not symlinked) venv interpreter reads its pyvenv.cfg
    roots.add(os.path.dirname(exe))
    roots = sorted(r for r in roots if r not in ("/", ""))
    outer = [r for r in roots if not any(o != r and os.path.commonpath([o, r]) == o for o in roots)]
    return exe, outer


# As root: a private mount namespace binds each host folder at a mount point under a stage folder uid 65534 can
# reach, then drops to that uid and runs bwrap. argv: SOURCE POINT ... -- COMMAND...
_STAGE = 'set -e; while [ "$1" != -- ]; do mount --rbind "$1" "$2"; shift 2; done; shift; exec "$@"'


def isolated_command(bwrap: str, workdir: str, env: dict, network: bool = False, stage: str | None = None):
    """The command line that runs a command in `workdir` isolated as the module doc describes. As root, `stage` is
    an empty folder (mode 755) for the mount points: bwrap then runs as uid 65534, because the kernel exempts
    host root from RLIMIT_NPROC even inside a user namespace (fork loops would be unbounded), and that uid may
    not reach the host folders (an interpreter under /root) by their paths."""
    exe, roots = interpreter()
    binds = [("--ro-bind", r) for r in roots if os.path.commonpath([r, "/usr"]) != "/usr"] + [("--bind", workdir)]
    source = {path: path for _, path in binds}
    cmd = []
    if stage is not None:
        cmd = [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
               _STAGE, "stage"]
        for i, (_, path) in enumerate(binds):
            source[path] = os.path.join(stage, str(i))
            os.mkdir(source[path])
            cmd += [path, source[path]]
        cmd += ["--", shutil.which("setpriv") or "setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                "--clear-groups", "--"]
    cmd += [bwrap, "--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
            "--ro-bind", "/usr", "/usr"]
    if network:
        cmd.append("--share-net")
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr links, or real folders
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    for kind, path in binds:
        cmd += [kind, source[path], path]
    cmd += ["--chdir", workdir]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    return cmd


class _Folders:
    """The program's working folder (writable by the uid it runs as) and, as root, the stage for mount points;
    both removed afterwards."""

    def __enter__(self):
        self.workdir = tempfile.mkdtemp(prefix="semalign-sandbox-")
        self.stage = None
        if os.geteuid() == 0:
            os.chown(self.workdir, NOBODY, NOBODY)
            self.stage = tempfile.mkdtemp(prefix="semalign-sandbox-stage-")
            os.chmod(self.stage, 0o755)
        return self

    def __exit__(self, *exc):
        for folder in (self.workdir, self.stage):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


_PROBES: dict = {}  # (bwrap path, or "unisolated") -> None when usable, else the reason it is not


def _probe(cmd: list[str], **kwargs) -> str | None:
    """None when `cmd` runs the interpreter and it imports the standard library, else what went wrong."""
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, env={}, **kwargs)
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    if proc.returncode == 0 and proc.stdout.strip() == b"ok":
        return None
    return (proc.stderr.decode(errors="replace").strip()[-300:] or f"exit status {proc.returncode}")


_PROBE_CODE = ["-I", "-c", "import json, os, resource, runpy; print('ok')"]


def isolation_problem() -> str | None:
    """None when programs can run isolated here; otherwise what is missing and how to get it. The probe behind it
    runs once per bwrap."""
    name = os.environ.get(BWRAP_ENV) or "bwrap"
    bwrap = shutil.which(name)
    key = bwrap or name
    if key not in _PROBES:
        if bwrap is None:
            _PROBES[key] = f"{name!r} was not found (set by {BWRAP_ENV})" if os.environ.get(BWRAP_ENV) \
                else "bubblewrap ('bwrap') is not installed"
        else:
            with _Folders() as f:
                cmd = isolated_command(bwrap, f.workdir, {}, stage=f.stage) + [interpreter()[0]] + _PROBE_CODE
                _PROBES[key] = _probe(cmd)
    if _PROBES[key] is None:
        return None
    return (f"Code cannot run isolated: {_PROBES[key]}. Install bubblewrap (Debian/Ubuntu: apt-get install "
            f"bubblewrap; Fedora: dnf install bubblewrap) on a kernel that allows user namespaces "
            f"(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0), or point {BWRAP_ENV} "
            f"at a working bwrap")


def _launcher(unisolated: bool = False) -> str | None:
    """The bwrap path to isolate with, or None to run unisolated (only when accepted and safe); otherwise raises
    IsolationUnavailable saying what is missing."""
    missing = isolation_problem()
    if missing is None:
        return shutil.which(os.environ.get(BWRAP_ENV) or "bwrap")
    if not unisolated_allowed(unisolated):
        raise IsolationUnavailable(
            f"{missing}. To run generated code with limits but no isolation (it can then read the host's files "
            f"and reach its network), pass --allow-unisolated-execution (or {UNISOLATED_FLAG}=1), preferably "
            f"inside a disposable container or VM")
    if os.geteuid() == 0:
        if "unisolated" not in _PROBES:
            _PROBES["unisolated"] = _probe([interpreter()[0]] + _PROBE_CODE, **_as_nobody())
        if _PROBES["unisolated"] is not None:
            raise IsolationUnavailable(
                f"{missing}. Running unisolated was accepted, but this process is root and unisolated code never "
                f"runs as root (it could signal or overwrite anything); it would run as uid {NOBODY}, which "
                f"cannot start the interpreter {interpreter()[0]} ({_PROBES['unisolated']}). Install bubblewrap, "
                f"or run the evaluation as an unprivileged user")
    return None


def _as_nobody() -> dict:
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def _user_tasks(uid: int) -> int:
    """Processes and threads of `uid` now: RLIMIT_NPROC counts them all."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields.get("Threads", "1"))
        except (OSError, KeyError, ValueError):
            continue
    return count


def _rlimits(limits: Limits, isolated: bool) -> dict:
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else int(limits.timeout) + 1
    out = {"RLIMIT_CPU": cpu, "RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_FSIZE": limits.file_size_mb << 20,
           "RLIMIT_CORE": 0}
    if isolated:  # counted per user namespace: only the program's own processes
        out["RLIMIT_NPROC"] = limits.max_processes
    elif os.path.isdir("/proc"):  # counted over the whole host user (root's limit would not hold at all)
        uid = NOBODY if os.geteuid() == 0 else os.getuid()
        out["RLIMIT_NPROC"] = _user_tasks(uid) + limits.max_processes
    return out


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _drain(stream, kept: list):
    """Read `stream` to its end, keeping the first OUTPUT_LIMIT + 1 bytes' worth (a character can be 4 bytes)."""
    size = 0
    while chunk := stream.read1(1 << 16):
        if size < 4 * (OUTPUT_LIMIT + 1):
            kept.append(chunk)
            size += len(chunk)
    stream.close()


def _text(chunks):
    text = b"".join(chunks).decode(errors="replace")
    return text if len(text) <= OUTPUT_LIMIT else text[:OUTPUT_LIMIT] + "...[truncated]"


def run_program(code: str, limits: Limits | None = None, allow: bool = False, *, unisolated: bool = False) -> Result:
    """Run `code` as a Python program in the sandbox (see the module doc) and report how it ended. Refuses
    (ExecutionNotAllowed) unless execution is enabled, and (IsolationUnavailable) when it cannot be isolated and
    running unisolated was not accepted."""
    bwrap = require_execution(allow, "run_program", unisolated)
    limits = limits or Limits()
    with _Folders() as folders:
        workdir = folders.workdir
        program = os.path.join(workdir, "program.py")
        with open(program, "w") as f:
            f.write(code)
        settings = json.dumps({"rlimits": _rlimits(limits, bwrap is not None), "network": limits.network})
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [interpreter()[0], "-I", "-c", _PREAMBLE, settings, program]
        extra = {}
        if bwrap is not None:
            cmd = isolated_command(bwrap, workdir, env, limits.network, folders.stage) + cmd
        elif os.geteuid() == 0:  # unisolated and root: never as root (see the module doc)
            extra = _as_nobody()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, **extra)
        out, err = [], []
        readers = [threading.Thread(target=_drain, args=(s, kept), daemon=True)
                   for s, kept in ((proc.stdout, out), (proc.stderr, err))]
        for t in readers:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        # the group leader's pid is the group id; kill what is left of the group either way (under bwrap this
        # ends its PID namespace and so every process the program started)
        _kill_group(proc.pid)
        proc.wait()
        for t in readers:
            t.join(timeout=5)  # a reader still blocked means an escaped writer: report what was read
        seconds = time.monotonic() - start
    stdout, stderr = _text(out), _text(err)
    rc = proc.returncode
    if timed_out:
        return Result("timeout", rc, seconds, stdout, stderr, f"timed out after {limits.timeout:g} s")
    if rc == 0:
        return Result("passed", rc, seconds, stdout, stderr)
    return Result("failed", rc, seconds, stdout, stderr, _reason(rc, stderr))


def _reason(rc, stderr):
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc is not None and rc > 128:  # bwrap reports its child's death by a signal as 128 + signal
        try:
            return f"killed by {signal.Signals(rc - 128).name}"
        except ValueError:
            pass
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {rc}"


def run_many(programs: list[str], limits: Limits | None = None, allow: bool = False, workers: int | None = None,
             progress=None, *, unisolated: bool = False) -> list[Result]:
    """Results of several programs, run `workers` at a time (each in its own sandbox), in input order."""
    require_execution(allow, "run_many", unisolated)
    from concurrent.futures import ThreadPoolExecutor, as_completed
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    results = [None] * len(programs)
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_program, code, limits, True, unisolated=unisolated): i
                   for i, code in enumerate(programs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress is not None:
                progress.update(1)
    return results
