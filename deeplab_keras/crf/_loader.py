"""Finds, rebuilds when needed, and loads the dense-CRF op library (once per process, on first use).

The library is looked up next to this file (where ``pip install --no-build-isolation -e .`` or
``python -m deeplab_keras.crf.build_op`` writes it), then in the user cache
(``$XDG_CACHE_HOME/deeplab_keras/crf/<stamp hash>/``, used when the package directory is read-only). A library
whose embedded stamp differs from the expected one (another TensorFlow version, older sources) is stale. A
missing or stale library is rebuilt when a C++ compiler is available; otherwise the error says how to build it.
"""
import contextlib
import fcntl
import hashlib
import os
import sys
import tempfile
import threading


_lock = threading.Lock()
_library = None

BUILD_COMMAND = "python -m deeplab_keras.crf.build_op"


class OpLibraryError(RuntimeError):
    """The op library is missing or stale and cannot be built here."""


def _build_op():
    import deeplab_keras.crf.build_op as build_op  # on use: `python -m deeplab_keras.crf.build_op` stays clean

    return build_op


def _cache_path(stamp):
    build_op = _build_op()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return os.path.join(root, "deeplab_keras", "crf", digest, os.path.basename(build_op.default_out_path()))


def candidate_paths(stamp):
    """Where a current library may live, in lookup order: the package directory, then the user cache."""
    build_op = _build_op()
    return [build_op.default_out_path(), _cache_path(stamp)]


def find_library(stamp=None):
    """Path of a current (non-stale) library, or None."""
    build_op = _build_op()
    stamp = stamp or build_op.expected_stamp()
    for path in candidate_paths(stamp):
        if build_op.read_stamp(path) == stamp:
            return path
    return None


@contextlib.contextmanager
def _build_lock(path):
    """Serialises concurrent builds of the same library across processes (pytest-xdist, notebooks)."""
    name = "deeplab_keras_crf_" + hashlib.sha256(path.encode()).hexdigest()[:16] + ".lock"
    with open(os.path.join(tempfile.gettempdir(), name), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _describe(stamp):
    build_op = _build_op()
    states = []
    for path in candidate_paths(stamp):
        found = build_op.read_stamp(path)
        if os.path.exists(path):
            states.append(f"{path} is stale (built for {found!r}, this install needs {stamp!r})")
    return "; ".join(states) or f"{build_op.default_out_path()} does not exist"


def ensure_library(verbose=True):
    """Returns the path of a current op library, building it first when it is missing or stale.

    Args:
        verbose: print a line to stderr before a (one-time, ~30 s) build.

    Raises:
        OpLibraryError: no current library and no C++ compiler to build one, or the build failed.
    """
    build_op = _build_op()
    stamp = build_op.expected_stamp()
    path = find_library(stamp)
    if path is not None:
        return path
    if build_op.find_compiler() is None:
        raise OpLibraryError(
            f"The dense-CRF op library is not built for this installation: {_describe(stamp)}. No C++ compiler "
            f"(g++ or $CXX) was found to build it. Install g++ and run `{BUILD_COMMAND}` (or reinstall with "
            f"`pip install --no-build-isolation -e .`).")
    target = build_op.default_out_path()
    if not os.access(os.path.dirname(target), os.W_OK):
        target = _cache_path(stamp)
    with _build_lock(target):
        if build_op.read_stamp(target) == stamp:  # built by another process meanwhile
            return target
        if verbose:
            print(f"deeplab_keras: building the dense-CRF op into {target} (one time, about 30 s) ...",
                  file=sys.stderr, flush=True)
        try:
            build_op.build(target)
        except RuntimeError as err:
            raise OpLibraryError(f"{err}\nFix the problem above and run `{BUILD_COMMAND}`.") from err
    return target


def load_library():
    """The loaded op module (``tf.load_op_library``), building the library first when needed."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                import tensorflow as tf

                _library = tf.load_op_library(ensure_library())
    return _library
