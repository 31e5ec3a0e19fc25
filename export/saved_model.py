"""SavedModel export in TF Serving layout.

``OUT/<version>/`` (tag ``serve``) with two signatures:

- ``serving_default``: ``image`` uint8 ``[N, H, W, 3]`` (any H, W) -> ``labels`` int32 ``[N, H, W]`` and
  ``probabilities`` float32 ``[N, H, W, C]`` at the input size.
- ``serving_bytes``: ``image_bytes`` string ``[N]`` (encoded JPEG/PNG/BMP; the images of one request must share a
  size) -> the same outputs.

The graph holds stock TF ops only (checked), so a plain ``tensorflow`` process or TF Serving runs it without this
package. It is written with ``keras.export.ExportArchive``, the path Keras' own ``model.export`` uses.

Example:
    >>> report = export_saved_model(model, "serving/deeplab")          # doctest: +SKIP
    >>> # tensorflow_model_server --rest_api_port=8501 --model_name=deeplab --model_base_path=$PWD/serving/deeplab
"""
import os
import re

import numpy as np
import tensorflow as tf

from deeplab_keras.export import common
from deeplab_keras.export import verify as verify_lib
from deeplab_keras.models import as_float32

SIGNATURE_IMAGE = "serving_default"
SIGNATURE_BYTES = "serving_bytes"


def next_version(base_dir):
    """1 + the largest integer-named subdirectory of ``base_dir`` (1 when there is none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = [int(d) for d in os.listdir(base_dir) if re.fullmatch(r"\d+", d)
                and os.path.isdir(os.path.join(base_dir, d))]
    return max(versions, default=0) + 1


def _decode_batch(encoded):
    """Decodes a ``[N]`` string tensor of JPEG/PNG/BMP images into uint8 ``[N, H, W, 3]``."""
    return tf.map_fn(lambda data: tf.io.decode_image(data, channels=3, expand_animations=False), encoded,
                     fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def build_archive(model, crf=None):
    """A ``keras.export.ExportArchive`` with the two serving signatures of the module docstring.

    Args:
        model: float32 Keras model (RGB 0..255 in, logits out).
        crf: optional stock-TF-op refinement ``crf(probabilities, images) -> probabilities``.
    """
    import keras

    def serve_image(image):
        return common.serving_outputs(model, tf.cast(image, tf.float32), "full", crf)

    def serve_bytes(image_bytes):
        return serve_image(_decode_batch(image_bytes))

    # No ``archive.track(model)``: it would add the model's ``keras.Variable`` wrappers beside the ``tf.Variable``s
    # the endpoints capture, and TF's checkpoint writes both (every weight twice: keras-team/keras#23553). The
    # endpoints alone carry every variable they use; the model has no lookup tables that would need tracking.
    archive = keras.export.ExportArchive()
    archive.add_endpoint(SIGNATURE_IMAGE, serve_image,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="image")])
    archive.add_endpoint(SIGNATURE_BYTES, serve_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    return archive


def saved_model_ops(path):
    """The set of op types in a SavedModel's graph and function library (calls to library functions excluded)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for meta in proto.meta_graphs:
        graph = meta.graph_def
        functions = {f.signature.name for f in graph.library.function}
        ops |= {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
        ops -= functions
    return ops


def non_stock_ops(path):
    """Op types of the SavedModel at ``path`` that are not TensorFlow built-ins (custom ops), sorted."""
    return sorted(op for op in saved_model_ops(path) if not hasattr(tf.raw_ops, op))


def load_signature(path, signature=SIGNATURE_IMAGE):
    """``(loaded, function)``: the SavedModel at ``path`` and its ``signature`` (keep ``loaded`` while calling the
    function: it owns the variables).

    Raises:
        common.ExportError: ``path`` is not a SavedModel directory, or has no such signature (one line naming the
            signatures it has and how to make a servable one).

    Example:
        >>> loaded, fn = load_signature("serving/deeplab/1")            # doctest: +SKIP
    """
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise common.ExportError(f"{path} is not a SavedModel directory (no saved_model.pb); give a version "
                                 "directory written by deeplab-export --format saved_model, e.g. serving/deeplab/1")
    loaded = tf.saved_model.load(path)
    if signature not in loaded.signatures:
        raise common.ExportError(
            f"SavedModel {path} has no {signature!r} signature (it has {sorted(loaded.signatures) or 'none'}); "
            "export the model with deeplab-export --format saved_model")
    return loaded, loaded.signatures[signature]


def run_saved_model(path, images, signature=SIGNATURE_IMAGE):
    """Runs a SavedModel signature on uint8 images (or encoded bytes for ``serving_bytes``); numpy outputs."""
    loaded, fn = load_signature(path, signature)  # `loaded` stays referenced while fn runs
    key = "image_bytes" if signature == SIGNATURE_BYTES else "image"
    outputs = {k: v.numpy() for k, v in fn(**{key: tf.constant(images)}).items()}
    del loaded
    return outputs


def export_saved_model(model, out, version=None, overwrite=False, crf=None, sample_dir=None, num_samples=4,
                       verify_size=(97, 129), tolerance=None, report_path=None, progress=None):
    """Exports ``model`` as a verified TF Serving SavedModel ``out/<version>/``.

    Args:
        model: Keras model, float32 RGB 0..255 ``[N, H, W, 3]`` -> logits; mixed precision is exported as float32.
        out: model base path (TF Serving's ``--model_base_path``).
        version: integer version directory; default the next free integer.
        overwrite: replace an existing ``out/<version>``.
        crf: optional stock-TF-op refinement ``crf(probabilities, images) -> probabilities``.
        sample_dir: folder of verification images (default synthetic images).
        num_samples: number of verification images.
        verify_size: ``(H, W)`` the verification images are resized to.
        tolerance: ``verify.Tolerance`` (default ``verify.TOLERANCES["float32"]``: max |diff| 1e-4,
            times the CRF's measured amplification with ``crf``; 99.9 % labels).
        report_path: JSON report path (default ``out/<version>.report.json``).
        progress: ``common.Progress`` for progress lines (default silent).
    Returns:
        the report dict (also written as JSON).
    Raises:
        common.ExportError: bad destination; verify.VerificationError: outputs out of tolerance.
    """
    progress = progress or common.Progress(False)
    crf = common.crf_for(crf, "tf") if crf is not None else None
    version = next_version(out) if version is None else int(version)
    if version < 0:
        raise common.ExportError(f"--version must be a non-negative integer, got {version}")
    final = os.path.join(os.path.abspath(out), str(version))
    common.check_destination(final, overwrite, "SavedModel version directory")
    model = as_float32(model)
    tolerance = tolerance or verify_lib.TOLERANCES["float32"]
    images = common.load_samples(verify_size, sample_dir, num_samples)
    with common.staging(final, progress) as stage:
        staged = os.path.join(stage.path, str(version))
        with progress.step("export_s", f"writing SavedModel (version {version})"):
            with common.disk_errors(final):
                build_archive(model, crf).write_out(staged, verbose=False)
        custom = non_stock_ops(staged)
        if custom:
            raise common.ExportError(f"the SavedModel uses non-stock ops {custom}; TF Serving cannot run them "
                                     "(export without the custom CRF op)")
        with progress.step("verify_s", "verifying SavedModel with TensorFlow"):
            reference = common.reference_outputs(model, images, "full", crf)
            got = run_saved_model(staged, images)
            encoded = np.stack([tf.io.encode_png(im).numpy() for im in images])
            got_bytes = run_saved_model(staged, encoded, SIGNATURE_BYTES)
            tolerance, derivation = common.verification_tolerance(tolerance, model, images, crf)
            result = verify_lib.run_checks([(SIGNATURE_IMAGE, reference, got), (SIGNATURE_BYTES, reference, got_bytes)],
                                           tolerance, progress, derivation)
        report = common.base_report(
            "saved_model", model, final, common.path_size(staged), version=version, tags=["serve"],
            signatures={SIGNATURE_IMAGE: {"inputs": {"image": "uint8 [N,H,W,3]"},
                                          "outputs": {"labels": "int32 [N,H,W]",
                                                      "probabilities": "float32 [N,H,W,C]"}},
                        SIGNATURE_BYTES: {"inputs": {"image_bytes": "string [N] (JPEG/PNG/BMP)"},
                                          "outputs": {"labels": "int32 [N,H,W]",
                                                      "probabilities": "float32 [N,H,W,C]"}}},
            with_crf=crf is not None, crf=getattr(crf, "config", None), precision="float32",
            ops=sorted(saved_model_ops(staged)), created_dirs=stage.created,
            verification=result, timings=dict(progress.timings),
            samples=sample_dir or "synthetic")
        return common.finalize(report, staged, final, overwrite, report_path, progress)
