"""One writer per run folder: an exclusive lock held by the process that trains into it.

``<run>/.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) for the whole of a
``kdcli train``/``distill`` session, fresh or ``--resume``, and holds the writer's pid and host. The
kernel releases a flock when its process ends, however it ends (SIGKILL included), so a lock can
never outlive its owner; what can remain is the file with a dead writer's pid in it. The next
session takes the lock and reports that stale record (the previous writer ended without releasing,
so its last checkpoint is what ``--resume`` continues). On release the file is emptied, not removed:
removing it would let two processes lock two different files of the same name.

Under torchrun the lock is taken by rank 0 (the only rank that writes the folder).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError

LOCK_NAME = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_owner(text: str) -> tuple[int | None, str]:
    pid, _, host = text.strip().partition(" ")
    return (int(pid) if pid.isdigit() else None), host


class RunLock:
    """Context manager: the exclusive lock of ``folder`` (created if needed), or a one-line
    :class:`~kdcli.errors.ConfigError` naming the process that holds it."""

    def __init__(self, folder: Path, log: Callable[[str], None] = print, what: str = "--out") -> None:
        self.folder = Path(folder)
        self.log = log
        self.what = what
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> None:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            text = os.pread(fd, 256, 0).decode(errors="replace")
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.what} {self.folder}: cannot lock the run folder "
                                  f"({err.strerror or err})") from None
            pid, host = _read_owner(text)
            who = f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") \
                if pid else "another process"
            raise ConfigError(f"{self.what} {self.folder}: {who} is writing this run folder (it holds "
                              f"{self.path}); wait for it to finish or stop it, or choose another --out") from None
        previous = os.pread(fd, 256, 0).decode(errors="replace")
        pid, host = _read_owner(previous)
        if pid is not None and pid != os.getpid():
            here = not host or host == socket.gethostname()
            state = "no longer runs" if here and not pid_alive(pid) else "ended without releasing it"
            self.log(f"note: {self.path}: stale lock of process {pid} ({state}); taken over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: released cleanly, nothing stale to report
        except OSError:
            pass  # a read-only or full disk: the flock still goes with the descriptor
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
