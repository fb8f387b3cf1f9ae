"""The run directory: where every phase leaves its results, and the rules that make a rerun trustworthy.

- Every file is written whole or not at all: into NAME.tmp, flushed to disk, then renamed over NAME.
- Every tensor file a run reuses carries a checksum, recorded when it is written (NAME.sha256 beside it) and
  checked before it is read back; a damaged file is never used: the caller recomputes it where it can, or the run
  stops with a message that names the file and the fix.
- state.json lists the finished phases; a phase is marked only after everything it wrote is complete.
- One run per directory at a time: run.lock, held by rank 0 for the whole run (released by the kernel when the
  process dies, so a killed run never leaves a stale lock behind).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from semalign_ds.config import ConfigError


class DamagedFile(ConfigError):
    """A file of the run directory fails its checksum or cannot be read."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder):
    """{path relative to folder: sha256} of every file below `folder`: what a folder written whole is checked by."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = sha256(path)
    return out


def _disk_error(path, err):
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConfigError(f"no space left on the device holding {path}: free space there or set another "
                           f"output_dir; rerun the same command to resume")
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ConfigError(f"cannot write {path} ({err.strerror}): choose an output_dir you can write to")
    return ConfigError(f"cannot write {path}: {err}")


@contextlib.contextmanager
def writing(path):
    """Writes of `path` inside the block that fail because the device is full (or read-only) stop the run with a
    message naming the path and the fix. torch's and DeepSpeed's C++ writers say only "iostream error", so the
    free space is looked at too."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        try:
            full = shutil.disk_usage(folder).free < (64 << 20)
        except OSError:
            full = False
        if full or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise ConfigError(f"no space left on the device holding {path}: free space there or set another "
                              f"output_dir; rerun the same command to resume") from err
        if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _disk_error(path, err) from err
        raise


def commit(tmp, path):
    """fsync `tmp` and rename it over `path`: a crash leaves the old file or the new one, never a mix."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_file(path, write):
    """Write `path` whole or not at all: write(tmp) fills a temporary file beside it, which then replaces it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with writing(path):
            write(tmp)
            commit(tmp, path)
    finally:
        _remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_file(path, write)


def write_json(path, value, **dump):
    """A JSON file written whole or not at all; `dump`: json.dumps options besides indent=2 (default=str)."""
    write_text(path, json.dumps(value, indent=2, **dump))


def read_json(path, what="file"):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFile(f"{path} ({what}) is damaged ({err}); delete it, or the whole run directory to start "
                          f"over") from err


def write_json_checked(path, value):
    """A JSON file that a later run reuses: written atomically, with its checksum beside it."""
    write_json(path, value)
    with open(path + ".sha256.tmp", "w") as f:
        f.write(sha256(path) + "\n")
    commit(path + ".sha256.tmp", path + ".sha256")


def read_json_checked(path, what="file"):
    if not verified(path):
        raise DamagedFile(f"{path} ({what}) is missing; delete state.json to redo the run, or start over")
    return read_json(path, what)


def save_tensors(path, tensors: dict):
    """Save a safetensors file atomically with its checksum beside it (NAME.sha256)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with writing(path):
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
            digest = sha256(tmp)
            commit(tmp, path)
            with open(path + ".sha256.tmp", "w") as f:
                f.write(digest + "\n")
            commit(path + ".sha256.tmp", path + ".sha256")
    finally:
        _remove(tmp)
    return digest


def verified(path):
    """True when `path` and its checksum are present and agree; raises DamagedFile when they disagree (or the
    checksum is missing beside a present file); False when the file is absent."""
    if not os.path.isfile(path):
        return False
    side = path + ".sha256"
    if not os.path.isfile(side):
        raise DamagedFile(f"{path} has no checksum ({os.path.basename(side)}): it was not written completely by "
                          f"this version; delete it and rerun to recompute it")
    with open(side) as f:
        want = f.read().strip()
    if sha256(path) != want:
        raise DamagedFile(f"{path} fails its checksum (damaged or changed since it was written); delete it and "
                          f"rerun to recompute it")
    return True


def intact(path):
    """True when `path` is present and agrees with its checksum (never raises)."""
    try:
        return verified(path)
    except DamagedFile:
        return False


def load_tensors(path, device="cpu"):
    """A checked safetensors file: verified against its checksum before it is read."""
    if not verified(path):
        raise DamagedFile(f"{path} is missing; delete the run directory's state.json entry for it or start over")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as err:
        raise DamagedFile(f"{path} cannot be read ({err}); delete it and rerun") from err


def remove(path):
    """Remove a checked file and its checksum."""
    for p in (path, path + ".sha256"):
        _remove(p)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class RunDir:
    def __init__(self, root):
        self.root = root
        self._lock = None

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def check_usable(self):
        """Refuse an output_dir that is a file or lies on storage this process cannot write, creating nothing."""
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"output_dir: {self.root} exists and is not a folder; choose another output_dir")
        probe = os.path.abspath(self.root)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ConfigError(f"output_dir: {probe} is a file, so {self.root} cannot be made; choose another "
                              f"output_dir")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write {self.root} ({probe} is read-only or not writable by this user): "
                              f"choose an output_dir you can write to")

    def make(self, *folders):
        self.check_usable()
        for folder in folders:
            path = self.path(folder)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ConfigError(f"output_dir: {path} exists and is not a folder; choose another output_dir")
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as err:
                raise _disk_error(path, err) from err
        probe = self.path(f".write-test.{os.getpid()}")
        try:
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as err:
            raise _disk_error(self.root, err) from err

    # --- one run at a time -----------------------------------------------------------------------------------
    def lock(self):
        """Hold run.lock for the life of this process, or refuse with the holder's name."""
        path = self.path("run.lock")
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"{self.root} is in use by another run ({holder}); wait for it to finish, stop it, "
                              f"or use another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle

    def unlock(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- state -----------------------------------------------------------------------------------------------
    def read_state(self):
        path = self.path("state.json")
        if not os.path.isfile(path):
            return {"done": {}}
        state = read_json(path, "the run's finished phases")
        if not isinstance(state, dict) or not isinstance(state.get("done"), dict):
            raise DamagedFile(f"{path} is not a run state (no 'done' mapping); delete the run directory to start "
                              f"over")
        digest = state.pop("sha256", None)  # absent in run directories of older versions
        if digest is not None and digest != _state_digest(state):
            raise DamagedFile(f"{path} (the run's finished phases) is damaged (its checksum fails); delete the run "
                              f"directory to start over")
        return state

    def write_state(self, state):
        """state.json with the checksum of its content inside it: one atomic write, so that a kill never leaves a
        file and a checksum that disagree, and a flipped digit in a metric is caught like a broken bracket."""
        write_json(self.path("state.json"), {**state, "sha256": _state_digest(state)})


def _state_digest(state):
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
