"""Where an export is written: destination checks, the hidden staging folder, the atomic move into place and the
report next to the artifact (the file-system steps of ``driver.export_model``).

An export builds its artifact in a hidden folder next to ``out`` (same filesystem, so the final rename is atomic),
named after the owning process so that the next export can remove the leftovers of a killed one; it writes the
JSON report first (a full disk fails there, before anything is published), then renames the artifact into place.
A failed export leaves nothing but, after a failed verification, its report.

Example:
    >>> with staging("out/m.onnx") as stage:                          # doctest: +SKIP
    ...     write(os.path.join(stage.path, "m.onnx"))
    ...     finalize(report, os.path.join(stage.path, "m.onnx"), "out/m.onnx", overwrite=False)
"""
import contextlib
import errno
import os
import re
import shutil
import tempfile

import tensorflow as tf

from deeplab_keras.export import verify as verify_lib
from deeplab_keras.export.common import ExportError
from deeplab_keras.files import UnwritableError, atomic_write_json, check_writable


def check_destination(path, overwrite, what="artifact"):
    """Fails early (before the slow steps) when ``path`` cannot be written.

    Args:
        path: the final artifact path (file or directory).
        overwrite: whether an existing artifact may be replaced.
        what: a word for error messages.
    Raises:
        ExportError: ``path`` exists without ``overwrite``, or its folder is not writable.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise ExportError(f"{what} {path} already exists; pass --overwrite (overwrite=True) to replace it")
    try:  # the one writability check (deeplab_keras.files): a dangling link, a read-only folder, a full disk
        check_writable(path, what)
    except UnwritableError as err:
        raise ExportError(str(err)) from None


def file_destination(out, overwrite, what, suffix):
    """The absolute path of a single-file artifact (``.tflite``, ``.onnx``), checked before the slow steps.

    Args:
        out: the requested path.
        overwrite: whether an existing file may be replaced.
        what: a word for error messages, e.g. ``"ONNX file"``.
        suffix: the file suffix suggested when ``out`` is a directory, e.g. ``".onnx"``.
    Raises:
        ExportError: ``out`` is a directory, exists without ``overwrite``, or cannot be written.
    """
    final = os.path.abspath(out)
    if os.path.isdir(final):
        raise ExportError(f"--out {final} is a directory; give a file path such as {final}/model{suffix}")
    check_destination(final, overwrite, what)
    return final


# Hidden folders next to an artifact: ".<name>.tmp-<pid>.<start>-<random>" (staging) and ".<name>.old-..."
# (the previous artifact during a replace), named after the owning process (pid and start time) so that the
# next export can tell the leftovers of a killed one from those of an export still running.
_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)\.(?P<start>\d+)-[A-Za-z0-9_]+$")
_UNOWNED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")  # before owner tags


def _owner_tag():
    import psutil

    return f"{os.getpid()}.{int(psutil.Process().create_time())}"


def _owner_alive(pid, start):
    import psutil

    try:
        return int(psutil.Process(pid).create_time()) == start  # same pid and start time: the same process
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _hidden_dir(final_path, kind):
    parent = os.path.dirname(os.path.abspath(final_path))
    return tempfile.mkdtemp(prefix=f".{os.path.basename(final_path)}.{kind}-{_owner_tag()}-", dir=parent)


def sweep_stale(folder, progress=None):
    """Removes the staging folders that killed exports left in ``folder``; returns their paths.

    A folder is stale when its owner process is gone (or its pid now belongs to another process); untagged ones
    (older versions) when they are older than this process. A stale ``.<name>.old-*`` folder holding the previous
    artifact of an interrupted replace is renamed back to ``<name>`` if that is missing (nothing is lost).
    """
    import psutil

    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    started = psutil.Process().create_time()
    for name in names:
        path = os.path.join(folder, name)
        owned, unowned = _OWNED.match(name), _UNOWNED.match(name)
        if not (owned or unowned) or not os.path.isdir(path) or os.path.islink(path):
            continue
        if owned and _owner_alive(int(owned["pid"]), int(owned["start"])):
            continue
        if unowned and os.path.getmtime(path) >= started:
            continue
        match = owned or unowned
        old, final = os.path.join(path, "old"), os.path.join(folder, match["name"])
        if match["kind"] == "old" and os.path.lexists(old) and not os.path.lexists(final):
            os.rename(old, final)
            if progress is not None:
                progress.info(f"restored {final} from {path}, left by an interrupted export")
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        if progress is not None:
            progress.info(f"removed {path}, left by an interrupted export")
    return removed


def make_parents(folder):
    """Creates ``folder`` and its missing parents; returns the folders created, outermost first."""
    folder = os.path.abspath(folder)
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(missing):
        os.makedirs(path, exist_ok=True)
    return list(reversed(missing))


def staging_dir(final_path):
    """Creates a hidden temporary directory next to ``final_path`` (same filesystem, so rename is atomic), named
    after this process (see ``sweep_stale``); creates missing parent folders."""
    make_parents(os.path.dirname(os.path.abspath(final_path)))
    return _hidden_dir(final_path, "tmp")


class Staging:
    """Where an export builds its artifact: ``path`` (a fresh staging folder) and ``created`` (the parent folders
    this export created, outermost first)."""

    def __init__(self, path, created):
        self.path, self.created = path, created


@contextlib.contextmanager
def staging(final_path, progress=None):
    """Context manager around one export's staging folder (yields a ``Staging``).

    Missing parent folders of ``final_path`` are created (and said on ``progress``); stale staging folders of
    killed exports are removed first (``sweep_stale``). On exit the staging folder is removed; when the export
    failed, so are the parent folders it created, if still empty: nothing half written is left behind.
    """
    parent = os.path.dirname(os.path.abspath(final_path))
    created = make_parents(parent)
    if created and progress is not None:
        progress.info(f"created folder {created[0]} (it did not exist)")
    succeeded = False
    try:
        sweep_stale(parent, progress)
        stage = _hidden_dir(final_path, "tmp")
        try:
            yield Staging(stage, created)
            succeeded = True
        except OSError as e:  # name the artifact, not the hidden staging folder (a full disk while writing it)
            if e.filename and os.fspath(e.filename).startswith(stage):
                raise OSError(e.errno, e.strerror, os.path.abspath(final_path)) from e
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        if not succeeded:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # only if empty (a failed verification leaves its report)


@contextlib.contextmanager
def disk_errors(path):
    """Re-raises TensorFlow's file-system errors while writing ``path`` as ``OSError`` (a full disk as ENOSPC)."""
    try:
        yield
    except tf.errors.OpError as e:
        if "no space left" in str(e).lower():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e
        raise


def describe_os_error(error):
    """One line for an ``OSError`` of an export (a full disk: what to do)."""
    where = f" writing {error.filename}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on device{where}; nothing was written (free some space or choose another --out "
                "and run the export again)")
    return f"{error.strerror or error}{where}"


def publish(staged, final_path, overwrite):
    """Atomically moves ``staged`` (a file or directory) to ``final_path``.

    An existing ``final_path`` is replaced only with ``overwrite``; it is first renamed aside, so at every moment
    ``final_path`` is either the old complete artifact, absent for an instant, or the new complete one (a kill in
    that instant leaves the old one aside; the next export puts it back, see ``sweep_stale``).
    """
    final_path = os.path.abspath(final_path)
    aside = None
    if os.path.lexists(final_path):
        if not overwrite:
            raise ExportError(f"{final_path} already exists; pass --overwrite (overwrite=True) to replace it")
        aside = os.path.join(_hidden_dir(final_path, "old"), "old")
        os.rename(final_path, aside)
    try:
        os.rename(staged, final_path)
    except BaseException:
        if aside is not None:
            os.rename(aside, final_path)
            shutil.rmtree(os.path.dirname(aside), ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(os.path.dirname(aside), ignore_errors=True)


def path_size(path):
    """Size in bytes of a file, or of all files under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def default_report_path(final_path):
    """``<artifact>.report.json``: the JSON report sits next to the artifact (``OUT/<version>.report.json`` for a
    SavedModel version directory, ``model.tflite.report.json`` for a file)."""
    return os.path.abspath(final_path).rstrip(os.sep) + ".report.json"


def finalize(report, staged, final_path, overwrite, report_path=None, progress=None):
    """Publishes a verified artifact and writes its report; writes the report and raises when verification failed.

    Args:
        report: the export report; ``report["verification"]["passed"]`` decides.
        staged: the finished artifact in its staging location.
        final_path: where the artifact goes.
        overwrite: whether an existing artifact may be replaced.
        report_path: JSON report path (default ``default_report_path(final_path)``).
        progress: optional ``Progress``.
    Returns:
        ``report`` (with ``report_path``).
    Raises:
        verify.VerificationError: verification failed; the artifact is not published.
    """
    report_path = report_path or default_report_path(final_path)
    report["report_path"] = report_path
    verification = report["verification"]
    if not verification["passed"]:
        report["artifact"] = None
        atomic_write_json(report_path, report, indent=2)
        raise verify_lib.VerificationError(
            f"verification failed, {final_path} was not written: " + "; ".join(verification["failures"]) +
            f" (details in {report_path})", report)
    had_report = os.path.lexists(report_path)
    atomic_write_json(report_path, report, indent=2)  # first: a full disk fails here, before anything is published
    try:
        publish(staged, final_path, overwrite)
    except BaseException:
        if not had_report:
            with contextlib.suppress(OSError):
                os.remove(report_path)
        raise
    if progress is not None:
        progress.info(f"wrote {final_path} ({report['size_bytes'] / 1e6:.2f} MB) and {report_path}")
    return report
