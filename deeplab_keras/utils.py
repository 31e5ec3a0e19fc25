"""Small shared helpers without heavy imports: PASCAL VOC names and palette, atomic file writes, lock files and
a quiet TensorFlow start-up."""
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import sys
import tempfile
import time

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def lazy_exports(package, homes):
    """``__getattr__`` and ``__dir__`` for a package whose names load from their submodules on first use.

    Args:
        package: the package's ``__name__``.
        homes: ``{name: submodule}`` (``"ops"`` for ``package + ".ops"``).

    Example:
        >>> getattr_, dir_ = lazy_exports("deeplab_keras.crf", {"CRFParams": "params"})
        >>> getattr_("CRFParams").__name__
        'CRFParams'
    """
    import importlib

    def __getattr__(name):
        if name in homes:
            return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__


def voc_palette():
    """The PASCAL VOC colour map (the palette of VOC's own SegmentationClass PNGs) as [256, 3] uint8.

    Colour bits are the class index's bits interleaved: bit 3j+c of the index is bit 7-j of channel c.
    """
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        code, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[index] = rgb
    return palette


TEMP_PREFIX = ".tmp-"  # the temporary files of atomic_path / atomic_write, next to their target


def remove_temp_files(folder, prefixes=(TEMP_PREFIX,)):
    """Removes the temporary files (names starting with ``prefixes``) that a killed writer left in ``folder``.

    Only call it while no live process can be writing there (e.g. holding the folder's :func:`exclusive_lock`).

    Example:
        >>> remove_temp_files("/tmp/no_such_folder")
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(tuple(prefixes)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


@contextlib.contextmanager
def atomic_path(path, *, overwrite=True):
    """Yield a temporary path next to ``path`` for a writer that needs a file name (``model.save``,
    ``savefig``); on a clean exit the file is synced, given normal permissions (0666 & ~umask) and renamed
    onto ``path``. On an exception (a full disk, Ctrl-C) it is removed and ``path`` is left as it was.

    Args:
        path: destination file (its folder must exist). The temporary name ends with its base name, so
            writers that check the extension (``.keras``, ``.weights.h5``) accept it.
        overwrite: if False, an existing ``path`` raises FileExistsError (checked atomically at the rename).

    Example:
        >>> with atomic_path("/tmp/atomic_example.txt") as tmp:
        ...     _ = open(tmp, "w").write("done")
    """
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=TEMP_PREFIX,
                               suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="wb", *, overwrite=True, encoding=None):
    """Open a temporary file next to ``path``; on a clean exit it is synced and renamed onto ``path``
    (:func:`atomic_path`).

    On an exception (a full disk, Ctrl-C) the temporary file is removed and ``path`` is left as it was, so a
    file is never half written.

    Args:
        path: destination file (its folder must exist).
        mode: "wb" or "w".
        overwrite: if False, an existing ``path`` raises FileExistsError (checked atomically at the rename).
        encoding: text encoding for mode "w" (default UTF-8).

    Example:
        >>> with atomic_write("/tmp/atomic_example.txt", "w") as f:
        ...     _ = f.write("done")
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f


def _rename_no_replace(tmp, path):
    """Move ``tmp`` to ``path`` unless ``path`` exists (a hard link fails atomically on an existing name)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def atomic_write_bytes(path, data, overwrite=True):
    """Write ``data`` (bytes, or str written as UTF-8) to ``path`` atomically; see :func:`atomic_write`.

    Example:
        >>> atomic_write_bytes("/tmp/atomic_example.bin", b"data")
    """
    with atomic_write(path, "wb", overwrite=overwrite) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def atomic_write_json(path, obj, indent=1):
    """Write ``obj`` as JSON (numpy values converted) atomically; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    atomic_write_bytes(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")
    return os.fspath(path)


class UnwritableError(ValueError):
    """An output path that cannot be written, found before the work (a usage error: exit 2 at the command line)."""


def check_writable(path, what="--out", *, folder=False):
    """Fails early (before the slow work) when nothing can be created at ``path``; returns its absolute path.

    The nearest existing folder (``path`` itself for an existing ``folder``) is really written to (a probe
    folder is made and removed): permission bits say little for root, read-only mounts or a full disk.

    Args:
        path: the output file or folder (missing parent folders are fine: they will be created).
        what: how the message names it, e.g. ``"--out"``.
        folder: ``path`` is a folder of outputs (an existing file there is an error).

    Raises:
        UnwritableError: (a ValueError) a dangling symbolic link, a file in the way, a read-only or full folder;
            one line naming the path and what to do.

    Example:
        >>> check_writable("/tmp/deeplab_example/out.json")
        '/tmp/deeplab_example/out.json'
    """
    path = os.path.abspath(os.fspath(path))
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UnwritableError(f"{what} {path} is an existing file, not a folder; choose a folder path")
    probe = path
    while not os.path.exists(probe):  # the nearest existing folder; a dangling link on the way is named
        if os.path.islink(probe):
            raise UnwritableError(f"{what} {path}: {probe} is a dangling symbolic link (to {os.readlink(probe)!r}); "
                                  "remove it or choose another path")
        probe = os.path.dirname(probe)
    if probe == path and not (folder and os.path.isdir(path)):
        probe = os.path.dirname(path)  # an existing file (or artifact folder) is replaced from its folder
    if not os.path.isdir(probe):
        raise UnwritableError(f"cannot write {what} {path}: {probe} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deeplab-probe-", dir=probe))
    except OSError as err:
        raise UnwritableError(f"cannot write {what} {path}: {write_error_text(err, probe)}") from None
    return path


def write_error_text(err, where):
    """What an ``OSError`` while writing ``where`` means, and what to do: a full disk is not a permission error.

    Example:
        >>> write_error_text(OSError(errno.ENOSPC, "No space left on device"), "/data")
        'no space left on device in /data; free some space or choose another path'
    """
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device in {where}; free some space or choose another path"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where} is not writable ({err.strerror}); choose another path or change its permissions"
    return f"{where}: {err.strerror or err}"


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


def run_command(prog, body, *, debug=False, interrupted="interrupted", expected=(ValueError, RuntimeError, OSError)):
    """Run a command line's ``body()`` (returns the exit code), turning failures into one line on stderr.

    Ctrl-C prints ``<prog>: <interrupted>`` (or the ``KeyboardInterrupt``'s own message, e.g. a download's) and
    returns 130; any other exception prints
    ``<prog>: error: <message>`` (with the exception's type and a ``--debug`` hint unless it is ``expected``)
    and returns 1. With ``debug`` both are re-raised, traceback included. ``SystemExit`` (usage errors) passes.

    Example:
        >>> run_command("deeplab-x", lambda: 0)
        0
    """
    try:
        return body()
    except KeyboardInterrupt as err:
        if debug:
            raise
        said = str(err) if type(err) is KeyboardInterrupt else ""  # a step may say what it stopped (a download)
        print(f"{prog}: {said or interrupted}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (one line instead of a traceback; --debug shows it)
        if debug:
            raise
        hint = "" if isinstance(err, expected) else f" ({type(err).__name__}; rerun with --debug for the traceback)"
        print(f"{prog}: error: {' '.join(str(err).split()) or type(err).__name__}{hint}", file=sys.stderr)
        return 1


# TensorFlow's start-up lines on a machine without a GPU (absl logs before absl::InitializeLog, which no
# environment variable silences): oneDNN / CPU-feature banners, "Could not find cuda drivers", "failed call to
# cuInit", duplicate cuDNN/cuFFT/cuBLAS factory registrations. Other lines (real errors) are always shown.
_TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} \d\d:\d\d:\d\d"
    r"|E\d{4} .*(cuda|cuInit|CUDA|cuDNN|cuFFT|cuBLAS|computation placer|TensorRT)"
    r"|To enable the following instructions|This TensorFlow binary is optimized)")
_swallowed = []  # TensorFlow start-up lines hidden so far; quiet_tensorflow(debug=True) shows them


def quiet_tensorflow(debug=False, *, python_logs=True):
    """Import TensorFlow (and let it look for GPUs) without its start-up noise on stderr unless ``debug``.

    The first call imports TensorFlow with file descriptor 2 redirected to a temporary file, then writes back
    every line that is not known start-up noise (see ``_TF_NOISE``). ``deeplab_keras`` calls it on import;
    command-line entry points call it again first thing in ``main`` with their ``--debug`` flag, which then
    shows the hidden lines and TensorFlow's Python INFO/WARNING logs.

    Args:
        debug: show everything (hidden start-up lines are replayed; C++ logs at level 0 if not yet imported).
        python_logs: also set the ``absl`` and ``tensorflow`` Python loggers (ERROR, or INFO with ``debug``).

    Example:
        >>> from deeplab_keras.utils import quiet_tensorflow
        >>> quiet_tensorflow(debug=False)   # first line of a CLI main(); then import/use TensorFlow
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "2")
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                import tensorflow as tf
                tf.config.list_physical_devices("GPU")  # cuInit happens here, inside the redirect
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
        shown = [line for line in lines if not _TF_NOISE.match(line)]
        _swallowed.extend(line for line in lines if _TF_NOISE.match(line))
        sys.stderr.write("".join(shown))
    if debug and _swallowed:
        sys.stderr.write("".join(_swallowed))
        _swallowed.clear()
    if python_logs:
        level = logging.INFO if debug else logging.ERROR
        logging.getLogger("absl").setLevel(level)
        logging.getLogger("tensorflow").setLevel(level)
