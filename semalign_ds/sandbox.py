"""Run untrusted generated code (HumanEval/MBPP programs) in a child process with limits.

What a program gets:
- its own process session and group (start_new_session); on a wall-clock timeout, and after every run, the whole
  group is killed with SIGKILL, so children it started end with it;
- resource limits set in the child before the program runs: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space),
  RLIMIT_FSIZE (largest file it may write), RLIMIT_CORE = 0, and RLIMIT_NPROC (processes of this user) when not
  running as root (root is exempt from RLIMIT_NPROC, so it is not set there);
- a fresh temporary working directory (also HOME and TMPDIR), removed afterwards, and a minimal environment;
- no network: when the OS lets us (`unshare` with a new network namespace: as root, or unprivileged through a user
  namespace), the program runs in an empty network namespace (loopback only, down) and a new PID namespace, in
  which every process dies when the program's main process ends, even one that left the process group with
  setsid. Otherwise (no namespaces) socket creation other than AF_UNIX is refused by patching `socket.socket` in
  the child's preamble: best-effort only, a program can reach the `_socket` module directly.

This is not a security boundary against a determined adversary (the file system outside the temporary folder is
reachable; use a container or VM for that). It keeps mistakes of generated code (infinite loops, huge allocations,
runaway writes, fork loops) from hurting the evaluation.

Code runs only when execution is enabled explicitly: `allow=True` (the launchers' --allow-code-execution) or the
environment variable SEMALIGN_DS_ALLOW_CODE_EXECUTION=1; otherwise ExecutionNotAllowed says how to enable it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from semalign_ds.config import ConfigError

ENV_FLAG = "SEMALIGN_DS_ALLOW_CODE_EXECUTION"
OUTPUT_LIMIT = 4096  # characters of stdout/stderr kept in a Result


class ExecutionNotAllowed(ConfigError):
    pass


def execution_allowed(allow: bool = False) -> bool:
    return bool(allow) or os.environ.get(ENV_FLAG, "") in ("1", "true", "yes")


def require_execution(allow: bool = False, what="this evaluation"):
    """Refuse unless code execution was enabled; the message says how to enable it."""
    if not execution_allowed(allow):
        raise ExecutionNotAllowed(
            f"{what} runs model-generated code. It runs in a child process with time, memory, file-size and "
            f"network limits (semalign_ds/sandbox.py), which is not a full security boundary. Enable it "
            f"explicitly with --allow-code-execution (or {ENV_FLAG}=1), preferably inside a container")


@dataclass
class Limits:
    timeout: float = 10.0       # wall-clock seconds for the whole process group
    cpu_seconds: int | None = None  # RLIMIT_CPU; default: ceil(timeout) + 1
    memory_mb: int = 2048       # RLIMIT_AS
    file_size_mb: int = 16      # RLIMIT_FSIZE: the largest file the program may write
    max_processes: int = 32     # RLIMIT_NPROC headroom above the user's current count (non-root only)
    network: bool = False


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

_NAMESPACES = None


def namespace_prefix() -> list[str]:
    """The `unshare` command line that isolates network and PIDs here, or [] when the OS does not allow it
    (probed once per process)."""
    global _NAMESPACES
    if _NAMESPACES is None:
        _NAMESPACES = []
        unshare = shutil.which("unshare")
        if unshare:
            base = [unshare, "--net", "--pid", "--fork", "--kill-child"]
            candidates = [base] if os.geteuid() == 0 else []
            candidates.append([unshare, "--user", "--map-root-user"] + base[1:])
            for cmd in candidates:
                try:
                    ok = subprocess.run(cmd + ["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, timeout=10).returncode == 0
                except (OSError, subprocess.TimeoutExpired):
                    ok = False
                if ok:
                    _NAMESPACES = cmd
                    break
    return list(_NAMESPACES)


def _user_tasks() -> int:
    """Processes and threads of this real user now: RLIMIT_NPROC counts them all."""
    uid, count = os.getuid(), 0
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


def _rlimits(limits: Limits) -> dict:
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else int(limits.timeout) + 1
    out = {"RLIMIT_CPU": cpu, "RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_FSIZE": limits.file_size_mb << 20,
           "RLIMIT_CORE": 0}
    if os.geteuid() != 0 and os.path.isdir("/proc"):
        out["RLIMIT_NPROC"] = _user_tasks() + limits.max_processes
    return out


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path):
    try:
        with open(path, errors="replace") as f:
            text = f.read(OUTPUT_LIMIT + 1)
    except OSError:
        return ""
    return text if len(text) <= OUTPUT_LIMIT else text[:OUTPUT_LIMIT] + "...[truncated]"


def run_program(code: str, limits: Limits | None = None, allow: bool = False) -> Result:
    """Run `code` as a Python program in a sandboxed child process (see the module doc) and report how it ended.
    Refuses (ExecutionNotAllowed) unless execution is enabled."""
    require_execution(allow, "run_program")
    limits = limits or Limits()
    workdir = tempfile.mkdtemp(prefix="semalign-sandbox-")
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w") as f:
            f.write(code)
        settings = json.dumps({"rlimits": _rlimits(limits), "network": limits.network})
        cmd = [sys.executable, "-I", "-c", _PREAMBLE, settings, program]
        prefix = [] if limits.network else namespace_prefix()
        if prefix:
            # a shell between unshare and Python: it turns a signal death into exit status 128 + signal, which
            # unshare passes on (unshare itself cannot always re-raise signals such as SIGXCPU)
            cmd = prefix + ["/bin/sh", "-c", '"$@"; exit $?', "sandbox"] + cmd
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            # the group leader's pid is the group id; kill what is left of the group either way
            _kill_group(proc.pid)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _read(out_path), _read(err_path)
        rc = proc.returncode
        if timed_out:
            return Result("timeout", rc, seconds, stdout, stderr, f"timed out after {limits.timeout:g} s")
        if rc == 0:
            return Result("passed", rc, seconds, stdout, stderr)
        return Result("failed", rc, seconds, stdout, stderr, _reason(rc, stderr))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _reason(rc, stderr):
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc is not None and rc > 128:  # in namespaces, the shell reports a signal death as 128 + signal
        try:
            return f"killed by {signal.Signals(rc - 128).name}"
        except ValueError:
            pass
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {rc}"


def run_many(programs: list[str], limits: Limits | None = None, allow: bool = False, workers: int | None = None,
             progress=None) -> list[Result]:
    """Results of several programs, run `workers` at a time (each in its own sandbox), in input order."""
    require_execution(allow, "run_many")
    from concurrent.futures import ThreadPoolExecutor, as_completed
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    results = [None] * len(programs)
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_program, code, limits, True): i for i, code in enumerate(programs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress is not None:
                progress.update(1)
    return results
