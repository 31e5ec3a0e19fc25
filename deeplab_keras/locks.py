"""Exclusive lock files (``fcntl.flock`` with the holder's pid inside) for run directories, caches and
output folders; imports only the standard library."""
import contextlib
import errno
import fcntl
import os
import time


class LockedError(RuntimeError):
    """Another live process holds an :func:`exclusive_lock`; the message names the lock file and its pid."""

    def __init__(self, message, path, pid):
        super().__init__(message)
        self.path, self.pid = path, pid


def _pid_alive(pid):
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_pid(fd):
    try:
        return int(os.pread(fd, 64, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def exclusive_lock(path, *, what=None, timeout=0.0, poll=0.05):
    """Hold an exclusive lock file (``fcntl.flock`` + this process's pid written inside) for the ``with`` block.

    The lock is the kernel's flock, so it is released when its holder exits in any way (SIGKILL too); a lock
    file left behind by a dead process is simply taken over. The file is removed on a clean release.

    Args:
        path: the lock file (its folder is created).
        what: what the lock protects, for the error message (e.g. "run directory runs/voc").
        timeout: seconds to wait for a live holder before giving up (0: fail at once).
        poll: seconds between attempts while waiting.

    Raises:
        LockedError: (a RuntimeError) another live process or thread holds the lock; names the file and pid.

    Example:
        >>> with exclusive_lock("/tmp/example.lock", what="the example folder"):
        ...     pass
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            pid = _read_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            if time.monotonic() < deadline:
                time.sleep(poll)
                continue
            holder = f"process {pid}" if pid is not None else "another process"
            if pid is not None and not _pid_alive(pid):
                holder += " (exited; a child process it started still holds the lock)"
            raise LockedError(f"{what or path} is in use by {holder} (lock file {path}); wait for it to finish "
                              "or stop it", path, pid) from None
        try:  # the holder before us may have removed the file after we opened it: lock the file at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still locked, so no one else can be holding the file at this path
        os.close(fd)
