"""A quiet TensorFlow start-up: TensorFlow's CUDA / oneDNN banners hidden unless ``--debug``."""
import logging
import os
import re
import sys
import tempfile

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
        >>> from deeplab_keras.tf_startup import quiet_tensorflow
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
