"""Pieces shared by the three exporters: the serving graph, float32 preparation, atomic writes, reports.

Every format exports the same computation (``serving_outputs``): the Keras model's logits at output stride,
resized to the input size inside the graph by ``deeplab_keras.inference.upsample_logits`` (corner-aligned
bilinear, the resize of training, ``deeplab-eval`` and ``deeplab-predict``), a softmax, and an argmax.
``outputs="logits"`` exports the raw logits at output stride instead (smaller, for devices that post-process
themselves). An optional ``crf`` callable refines the probabilities
before the argmax; it must be made of stock TF ops so that every format can carry it.
"""
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from deeplab_keras.inference import upsample_logits
from deeplab_keras.utils import atomic_write_json

OUTPUT_KINDS = ("full", "logits")


class ExportError(Exception):
    """A problem with the user's request (bad path, existing artifact, unusable option): exit code 2 at the CLI."""


def serving_outputs(model, images, outputs="full", crf=None):
    """The exported computation: images in, ``labels`` + ``probabilities`` (or ``logits``) out.

    Args:
        model: float32 Keras model, float32 ``[N, H, W, 3]`` RGB 0..255 -> logits ``[N, h, w, C]``.
        images: float32 tensor ``[N, H, W, 3]``, RGB 0..255.
        outputs: ``"full"`` (``labels`` int32 ``[N, H, W]`` and ``probabilities`` float32 ``[N, H, W, C]`` at the
            input size) or ``"logits"`` (``logits`` float32 ``[N, h, w, C]`` at output stride).
        crf: optional ``crf(probabilities, images) -> probabilities`` made of stock TF ops (``outputs="full"``).
    """
    logits = tf.cast(model(images, training=False), tf.float32)
    if outputs == "logits":
        return {"logits": logits}
    upsampled = upsample_logits(logits, tf.shape(images)[1:3])
    probabilities = tf.nn.softmax(upsampled, axis=-1)
    if crf is not None:
        probabilities = crf(probabilities, images)
        labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    else:
        labels = tf.argmax(upsampled, axis=-1, output_type=tf.int32)
    return {"labels": labels, "probabilities": probabilities}


def reference_outputs(model, images, outputs="full", crf=None, batch_size=1):
    """Runs ``serving_outputs`` eagerly with the Keras model: the reference each artifact is checked against.

    Args:
        model: the float32 Keras model.
        images: uint8 or float array ``[N, H, W, 3]``.
        outputs: see ``serving_outputs``.
        crf: see ``serving_outputs``.
        batch_size: images per call.
    Returns:
        dict of numpy arrays.
    """
    parts = []
    for start in range(0, len(images), batch_size):
        batch = tf.constant(np.asarray(images[start:start + batch_size], np.float32))
        parts.append({k: v.numpy() for k, v in serving_outputs(model, batch, outputs, crf).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def model_num_classes(model):
    """Number of classes (last dim of the logits) of ``model``."""
    num = getattr(model, "num_classes", None)
    if num is None:
        num = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    return int(num) if num is not None else None


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
    if os.path.lexists(path) and not overwrite:
        raise ExportError(f"{what} {path} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(path)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ExportError(f"cannot write {what} {path}: {probe} is not a directory")
    try:  # really try: permission bits say little for root or special filesystems such as /proc
        os.rmdir(tempfile.mkdtemp(prefix=".deeplab-export-probe-", dir=probe))
    except OSError as e:
        raise ExportError(f"cannot write {what} {path}: {probe} is not a writable directory ({e.strerror})")


def check_outputs(outputs):
    """Raises ``ExportError`` unless ``outputs`` is one of ``OUTPUT_KINDS``."""
    if outputs not in OUTPUT_KINDS:
        raise ExportError(f"outputs must be one of {OUTPUT_KINDS}, got {outputs!r}")


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


def staging_dir(final_path):
    """Creates a hidden temporary directory next to ``final_path`` (same filesystem, so rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(final_path)}.tmp-", dir=parent)


def publish(staged, final_path, overwrite):
    """Atomically moves ``staged`` (a file or directory) to ``final_path``.

    An existing ``final_path`` is replaced only with ``overwrite``; it is first renamed aside, so at every moment
    ``final_path`` is either the old complete artifact, absent for an instant, or the new complete one.
    """
    final_path = os.path.abspath(final_path)
    aside = None
    if os.path.lexists(final_path):
        if not overwrite:
            raise ExportError(f"{final_path} already exists; pass --overwrite (overwrite=True) to replace it")
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(final_path)}.old-", dir=os.path.dirname(final_path))
        aside = os.path.join(aside, "old")
        os.rename(final_path, aside)
    os.rename(staged, final_path)
    if aside is not None:
        shutil.rmtree(os.path.dirname(aside), ignore_errors=True)


def path_size(path):
    """Size in bytes of a file, or of all files under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def environment():
    """Versions of the libraries that shaped the artifact (for the report)."""
    import keras
    versions = {"python": sys.version.split()[0], "tensorflow": tf.__version__, "keras": keras.__version__}
    for name in ("tf2onnx", "onnx", "onnxruntime", "ai_edge_litert"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__version__", None):
            versions[name] = module.__version__
    return versions


class Progress:
    """Prints ``[deeplab-export] step ... done (1.2 s)`` lines to stderr; silent when ``enabled`` is False."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.timings = {}

    def step(self, name, message):
        """Context manager timing one slow step; its seconds land in ``self.timings[name]``."""
        return _Step(self, name, message)

    def info(self, message):
        """Prints one line."""
        if self.enabled:
            print(f"[deeplab-export] {message}", file=sys.stderr, flush=True)


class _Step:
    def __init__(self, progress, name, message):
        self.progress, self.name, self.message = progress, name, message

    def __enter__(self):
        self.start = time.perf_counter()
        self.progress.info(f"{self.message} ...")
        return self

    def __exit__(self, exc_type, exc, tb):
        seconds = time.perf_counter() - self.start
        self.progress.timings[self.name] = round(seconds, 3)
        if exc_type is None:
            self.progress.info(f"{self.message}: done ({seconds:.1f} s)")
        return False


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
    from deeplab_keras.export.verify import VerificationError

    report_path = report_path or default_report_path(final_path)
    report["report_path"] = report_path
    verification = report["verification"]
    if not verification["passed"]:
        report["artifact"] = None
        atomic_write_json(report_path, report, indent=2)
        raise VerificationError(
            f"verification failed, {final_path} was not written: " + "; ".join(verification["failures"]) +
            f" (details in {report_path})", report)
    publish(staged, final_path, overwrite)
    atomic_write_json(report_path, report, indent=2)
    if progress is not None:
        progress.info(f"wrote {final_path} ({report['size_bytes'] / 1e6:.2f} MB) and {report_path}")
    return report


def base_report(fmt, model, final_path, size, **fields):
    """Report fields shared by all formats."""
    report = {"format": fmt, "artifact": os.path.abspath(final_path), "size_bytes": int(size),
              "size_mb": round(size / 1e6, 3),
              "num_classes": model_num_classes(model), "model": getattr(model, "name", None),
              "created_unix": round(time.time(), 3), "environment": environment()}
    get_config = getattr(model, "get_config", None)
    try:
        config = get_config() if get_config else None
        if config and "layers" not in config:  # a DeepLabV2-style kwargs config, not a functional graph dump
            report["model_config"] = config
    except Exception:  # a config is nice to have, never required
        pass
    report.update(fields)
    return report


def portable_crf(iterations=10, **crf_kwargs):
    """The ``crf`` hook for exports: the stock-TF-op dense CRF (``deeplab_keras.crf.portable``).

    Args:
        iterations: mean-field iterations (unrolled into the exported graph).
        **crf_kwargs: other ``dense_crf_portable`` parameters (DeepLab v2 defaults otherwise).
    Returns:
        a ``PortableCRF``: ``crf(probabilities, images) -> probabilities`` taking float32 images in 0..255;
        each exporter calls ``crf.for_runtime(...)`` to trace the variant that is exact and fast in its runtime.
    """
    return PortableCRF(iterations=iterations, **crf_kwargs)


class PortableCRF:
    """Callable CRF hook over ``dense_crf_portable``; ``for_runtime`` picks the splat for a target runtime.

    Args:
        runtime: ``"tf"``, ``"litert"``, ``"onnx"`` or None (``deeplab_keras.crf.portable.RUNTIME_SPLAT``).
        **crf_kwargs: ``dense_crf_portable`` parameters (``iterations``, weights, stds, ``splat``, ...).
    """

    def __init__(self, runtime=None, **crf_kwargs):
        self.runtime = runtime
        self.crf_kwargs = crf_kwargs

    @property
    def config(self):
        """Parameters for the export report."""
        from deeplab_keras.crf.portable import RUNTIME_SPLAT

        return {**self.crf_kwargs, "runtime": self.runtime,
                "splat": self.crf_kwargs.get("splat", RUNTIME_SPLAT.get(self.runtime))}

    def for_runtime(self, runtime):
        """The same CRF traced for ``runtime`` (the splat that is exact and fastest there)."""
        return PortableCRF(runtime=runtime, **self.crf_kwargs)

    def __call__(self, probabilities, images):
        from deeplab_keras.crf.portable import RUNTIME_SPLAT, dense_crf_portable

        kwargs = dict(self.crf_kwargs)
        kwargs.setdefault("splat", RUNTIME_SPLAT[self.runtime])
        pixels = tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)
        return dense_crf_portable(probabilities, pixels, **kwargs)


def crf_for(crf, runtime):
    """``crf.for_runtime(runtime)`` when the hook supports it, else ``crf`` itself (any stock-op callable)."""
    return crf.for_runtime(runtime) if hasattr(crf, "for_runtime") else crf
