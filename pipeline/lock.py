"""Exclusive locks with flock(2): the kernel drops a lock when its holder dies, however it dies, so a
lock left by a killed run is never stale. The lock file names its holder for the message."""
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path


class FolderInUse(RuntimeError):
    """Another process holds the lock."""


class RunLock:
    """One writer per run folder, for the life of the run (`with RunLock(folder) as lock:`).

    `taken_over` names the holder of an earlier lock whose process is gone (it was killed)."""

    NAME = "lock"

    def __init__(self, folder: Path):
        self.folder, self.path, self.fd, self.taken_over = Path(folder), Path(folder) / self.NAME, None, None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUse(f"{self.folder} is in use by {describe(holder)}; wait for it to end or stop it "
                              "(a second run on one folder would train beside it)") from None
        earlier = _read_holder(fd)
        self.taken_over = describe(earlier) if earlier else None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # releases the flock


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return f"PID {holder['pid']} on {holder['host']} (started {holder['started']}: {holder['command']})"


@contextmanager
def file_lock(path: Path):
    """Blocking exclusive lock on `path` (created if missing), for short critical sections."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
