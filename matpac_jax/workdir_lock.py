"""The workdir lock: a run holds an exclusive ``flock`` on ``WORKDIR/.lock.process-<i>`` (``i`` its process index)
for as long as it trains, with its pid, host and command written in it; a second run of the same process index on the
same workdir fails at once naming the holder, while the processes of one job do not block each other. The kernel
releases the lock when the process ends, however it ends."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from matpac_jax.config_lib import ConfigError

LOCK_NAME = ".lock.process-{}"


class WorkdirBusyError(ConfigError):
    """Another run holds the workdir's lock; the message names it. Exit 2."""


class WorkdirLock:
    """Exclusive lock of one process index of a job on a workdir (``with WorkdirLock(workdir):``).

    ``WorkdirBusyError`` names the holder when another process holds it. On a filesystem without ``flock`` support
    a warning is printed and the run goes on unlocked."""

    def __init__(self, workdir: str, process_index: int | None = None):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME.format(process_index))
        self.fd: int | None = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"--workdir={os.path.dirname(self.path)} is in use by another run ({holder}): wait for it to end, "
                f"stop it, or give another --workdir (lock file {self.path})"
            ) from None
        except OSError as e:  # e.g. a FUSE mount without locks
            os.close(fd)
            detail = f"cannot lock {self.path} ({e.strerror})"
            print(f"warning: {detail}: a second run on this workdir would not be detected", file=sys.stderr, flush=True)
            return self
        since = time.strftime("%Y-%m-%d %H:%M:%S %z")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv), "since": since}
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(fd, 0)  # in place: replacing the file would hand a new, unlocked inode to the next run
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"
