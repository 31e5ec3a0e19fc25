"""Safe file output: atomic writes (temporary file, fsync, rename), the clean-up of temporaries a killed
writer left, and writability checks with error texts that tell a full disk from a permission error."""
import contextlib
import errno
import json
import os
import tempfile

import numpy as np

TEMP_PREFIX = ".tmp-"  # the temporary files of atomic_path / atomic_write, next to their target


def remove_temp_files(folder, prefixes=(TEMP_PREFIX,)):
    """Removes the temporary files (names starting with ``prefixes``) that a killed writer left in ``folder``.

    Only call it while no live process can be writing there (e.g. holding the folder's
    :func:`deeplab_keras.locks.exclusive_lock`).

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
