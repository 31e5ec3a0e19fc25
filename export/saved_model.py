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

from deeplab_keras.export import driver, serving, staging
from deeplab_keras.export.errors import ExportError

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


def build_archive(model, crf=None, rewrite=None):
    """The ``keras.export.ExportArchive`` (``serving.serving_archive``) with the two serving signatures of the
    module docstring.

    Args:
        model: float32 Keras model (RGB 0..255 in, logits out).
        crf: optional stock-TF-op refinement ``crf(probabilities, images) -> probabilities``.
        rewrite: optional ``graph_rewrite.GraphRewrite`` of ``model`` (the serving form of its layers).
    """
    archive, _ = serving.serving_archive(model, {
        SIGNATURE_IMAGE: (tf.TensorSpec([None, None, None, 3], tf.uint8, name="image"), None),
        SIGNATURE_BYTES: (tf.TensorSpec([None], tf.string, name="image_bytes"), _decode_batch)}, "full", crf,
        rewrite)
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
        ExportError: ``path`` is not a SavedModel directory, or has no such signature (one line naming the
            signatures it has and how to make a servable one).

    Example:
        >>> loaded, fn = load_signature("serving/deeplab/1")            # doctest: +SKIP
    """
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise ExportError(f"{path} is not a SavedModel directory (no saved_model.pb); give a version "
                                 "directory written by deeplab-export --format saved_model, e.g. serving/deeplab/1")
    loaded = tf.saved_model.load(path)
    if signature not in loaded.signatures:
        raise ExportError(
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


@driver.register
class SavedModelFormat(driver.Format):
    """``export_model`` hooks for a TF Serving SavedModel version directory (see ``export_saved_model``)."""
    name = "saved_model"
    # The fused ASPP head: 0.75x / 0.84x the time of the plain one in TF (benchmarks/export_runtimes.py: ResNet-50
    # x0.25 and ResNet-101 at 513x513); onnxruntime gains nothing from it (0.97x vs 0.96x), so ONNX keeps the plain.
    options = {"version": None, "aspp_head": "fused", "fold_batch_norm": True}
    crf_runtime = "tf"
    verify_message = "verifying SavedModel with TensorFlow"

    @property
    def convert_step(self):
        return "export_s", f"writing SavedModel (version {self.version})"

    def destination(self, out, overwrite):
        version = next_version(out) if self.opts["version"] is None else int(self.opts["version"])
        if version < 0:
            raise ExportError(f"--version must be a non-negative integer, got {version}")
        self.version = version
        final = os.path.join(os.path.abspath(out), str(version))
        staging.check_destination(final, overwrite, "SavedModel version directory")
        return final

    def sample_size(self, verify_size):
        return tuple(verify_size)

    def convert(self, model, stage_dir, final):
        staged = os.path.join(stage_dir, str(self.version))
        build_archive(model, self.crf, self.rewrite).write_out(staged, verbose=False)
        custom = non_stock_ops(staged)
        if custom:
            raise ExportError(f"the SavedModel uses non-stock ops {custom}; TF Serving cannot run them "
                                     "(export without the custom CRF op)")
        return staged

    def runners(self, artifact):
        def run_bytes(images):
            encoded = np.stack([tf.io.encode_png(im).numpy() for im in images])
            return run_saved_model(artifact, encoded, SIGNATURE_BYTES)

        return {SIGNATURE_IMAGE: lambda images: run_saved_model(artifact, images), SIGNATURE_BYTES: run_bytes}

    def report_fields(self, artifact):
        outputs = {"labels": "int32 [N,H,W]", "probabilities": "float32 [N,H,W,C]"}
        return {"version": self.version, "tags": ["serve"],
                "signatures": {SIGNATURE_IMAGE: {"inputs": {"image": "uint8 [N,H,W,3]"}, "outputs": outputs},
                               SIGNATURE_BYTES: {"inputs": {"image_bytes": "string [N] (JPEG/PNG/BMP)"},
                                                 "outputs": outputs}},
                "ops": sorted(saved_model_ops(artifact))}


def export_saved_model(model, out, version=None, overwrite=False, crf=None, sample_dir=None, num_samples=4,
                       verify_size=(97, 129), tolerance=None, report_path=None, progress=None, **graph_options):
    """Exports ``model`` as a verified TF Serving SavedModel ``out/<version>/`` (``driver.export_model``).

    Args:
        model: Keras model, float32 RGB 0..255 ``[N, H, W, 3]`` -> logits; mixed precision is exported as float32.
        out: model base path (TF Serving's ``--model_base_path``).
        version: integer version directory; default the next free integer.
        overwrite: replace an existing ``out/<version>``.
        crf: optional stock-TF-op refinement ``crf(probabilities, images) -> probabilities``.
        sample_dir: folder of verification images (default synthetic images).
        num_samples: number of verification images.
        verify_size: ``(H, W)`` the verification images are resized to.
        tolerance: ``verify.Tolerance`` (default ``verify.TOLERANCES["float32"]``: max |diff| 1e-4 or 4x the
            model's measured float32 sensitivity, times the CRF's measured amplification with ``crf``; 99.9 %
            labels).
        report_path: JSON report path (default ``out/<version>.report.json``).
        progress: ``report.Progress`` for progress lines (default silent).
        **graph_options: ``aspp_head`` (``"plain"`` or ``"fused"``), ``fold_batch_norm``
            (``graph_rewrite.GraphRewrite``).
    Returns:
        the report dict (also written as JSON).
    Raises:
        ExportError: bad destination; verify.VerificationError: outputs out of tolerance.
    """
    return driver.export_model(model, "saved_model", out, version=version, overwrite=overwrite, crf=crf,
                               sample_dir=sample_dir, num_samples=num_samples, verify_size=verify_size,
                               tolerance=tolerance, report_path=report_path, progress=progress, **graph_options)
