"""The serving graph every export format carries: the one ``ExportArchive`` builder, the Keras reference and the
portable CRF hook (verification: ``verify``; progress and report: ``report``; the steps in order: ``driver``).

Every format exports the same computation (``serving_outputs``): the Keras model's logits at output stride,
resized to the input size inside the graph by ``deeplab_keras.inference.upsample_logits`` (corner-aligned
bilinear, the resize of training, ``deeplab-eval`` and ``deeplab-predict``), a softmax, and an argmax.
``outputs="logits"`` exports the raw logits at output stride instead (smaller, for devices that post-process
themselves). An optional ``crf`` callable refines the probabilities before the argmax; it must be made of stock
TF ops so that every format can carry it (``portable_crf``: ``deeplab_keras.crf.portable.crf_postprocess``).
"""
import contextlib

import numpy as np
import tensorflow as tf

from deeplab_keras.export.errors import ExportError
from deeplab_keras.inference import upsample_logits

OUTPUT_KINDS = ("full", "logits")


def serving_outputs(model, images, outputs="full", crf=None):
    """The exported computation: images in, ``labels`` + ``probabilities`` (or ``logits``) out.

    Args:
        model: float32 Keras model, float32 ``[N, H, W, 3]`` RGB 0..255 -> logits ``[N, h, w, C]``.
        images: float32 tensor ``[N, H, W, 3]``, RGB 0..255.
        outputs: ``"full"`` (``labels`` int32 ``[N, H, W]`` and ``probabilities`` float32 ``[N, H, W, C]`` at the
            input size) or ``"logits"`` (``logits`` float32 ``[N, h, w, C]`` at output stride).
        crf: optional ``crf(probabilities, images) -> probabilities`` made of stock TF ops (``outputs="full"``).
    """
    return postprocess(tf.cast(model(images, training=False), tf.float32), images, outputs, crf)


def postprocess(logits, images, outputs="full", crf=None):
    """The part of ``serving_outputs`` after the model: float32 ``logits`` ``[N, h, w, C]`` of ``images`` (float32
    ``[N, H, W, 3]``) to the outputs."""
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


def serving_archive(model, endpoints, outputs="full", crf=None, rewrite=None):
    """The ``keras.export.ExportArchive`` of every format (the one place that builds one).

    Each endpoint computes ``serving_outputs`` of its input, after an optional ``to_images`` (e.g. decoding
    bytes); the input is cast to float32; with ``rewrite`` (a ``graph_rewrite.GraphRewrite``) the model's layers are
    traced in the serving form (native dilated convolutions, folded batch norm, optionally the fused ASPP head). The
    model is not ``track()``-ed: that would add its ``keras.Variable``
    wrappers beside the ``tf.Variable``s the endpoints capture, and TF's checkpoint writes both (every weight
    twice, keras-team/keras#23553); the endpoints alone carry every variable they use (the model has no lookup
    tables that would need tracking).

    Args:
        model: float32 Keras model.
        endpoints: ``{name: (tf.TensorSpec, to_images or None)}``; the first one is also ``serving_default``
            when no endpoint has that name.
        outputs: see ``serving_outputs``.
        crf: see ``serving_outputs``.
        rewrite: optional ``graph_rewrite.GraphRewrite`` of ``model``, entered while the endpoints are traced.
    Returns:
        ``(archive, functions)``: the archive (``archive.write_out(path)`` writes a SavedModel) and
        ``{name: tf.function}`` of its endpoints (what tf2onnx converts).

    Example:
        >>> archive, fns = serving_archive(
        ...     model, {"serve": (tf.TensorSpec([None, None, None, 3]), None)})  # doctest: +SKIP
        >>> archive.write_out("/tmp/sm", verbose=False)              # doctest: +SKIP
    """
    import keras

    def endpoint(to_images):
        def serve(image):
            with rewrite or contextlib.nullcontext():
                return serving_outputs(model, tf.cast(to_images(image) if to_images else image, tf.float32),
                                       outputs, crf)
        return serve

    archive = keras.export.ExportArchive()
    functions = {name: archive.add_endpoint(name, endpoint(to_images), input_signature=[spec])
                 for name, (spec, to_images) in endpoints.items()}
    return archive, functions


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


def check_outputs(outputs):
    """Raises ``ExportError`` unless ``outputs`` is one of ``OUTPUT_KINDS``."""
    if outputs not in OUTPUT_KINDS:
        raise ExportError(f"outputs must be one of {OUTPUT_KINDS}, got {outputs!r}")


def portable_crf(iterations=None, params=None, **crf_kwargs):
    """The ``crf`` hook for exports: the stock-TF-op dense CRF (``deeplab_keras.crf.portable``).

    Args:
        iterations: mean-field iterations (unrolled into the exported graph); None: those of ``params``.
        params: a ``deeplab_keras.crf.CRFParams``, a dict of some of its fields, or None (DeepLab v2 defaults).
        **crf_kwargs: ``CRFParams`` fields overriding ``params`` (``bilateral_weight=5``), and the
            ``dense_crf_portable`` options ``gaussian_filter`` / ``splat``.
    Returns:
        a ``PortableCRF``: ``crf(probabilities, images) -> probabilities`` taking float32 images in 0..255;
        the driver calls ``crf.for_runtime(...)`` to trace the variant that is exact and fast in its runtime.
    Raises:
        ValueError: a bad or unknown parameter (``CRFParams``' message).

    Example:
        >>> from deeplab_keras.crf.params import CRFParams
        >>> portable_crf(params=CRFParams(bilateral_weight=5), iterations=5).params.iterations
        5
    """
    from deeplab_keras.crf.params import CRFParams

    options = {key: crf_kwargs.pop(key) for key in PortableCRF.OPTIONS if key in crf_kwargs}
    if iterations is not None:
        crf_kwargs["iterations"] = iterations
    return PortableCRF(params=CRFParams.resolve(params, **crf_kwargs), **options)


class PortableCRF:
    """The CRF hook of the exports: ``crf(probabilities, images) -> probabilities`` over
    ``deeplab_keras.crf.portable.crf_postprocess`` (the one portable CRF); ``for_runtime`` picks the splat for a
    target runtime.

    Args:
        runtime: ``"tf"``, ``"litert"``, ``"onnx"`` or None (``deeplab_keras.crf.portable.RUNTIME_SPLAT``).
        params: a ``CRFParams`` (None: the defaults; learned kernel weights are its weights).
        compatibility: None (Potts) or a learned ``[C, C]`` label compatibility.
        **options: ``dense_crf_portable`` options (``OPTIONS``).
    """
    OPTIONS = ("gaussian_filter", "splat")

    def __init__(self, runtime=None, params=None, compatibility=None, **options):
        from deeplab_keras.crf.params import CRFParams

        self.runtime = runtime
        self.params = CRFParams.resolve(params)
        self.compatibility = None if compatibility is None else np.asarray(compatibility, np.float32)
        self.options = options

    @property
    def splat(self):
        """The splat traced: ``options["splat"]``, else the one exact and fastest in ``runtime``."""
        from deeplab_keras.crf.portable import RUNTIME_SPLAT

        return self.options.get("splat", RUNTIME_SPLAT.get(self.runtime))

    @property
    def config(self):
        """Parameters for the export report."""
        learned = {} if self.compatibility is None else {"compatibility": self.compatibility.tolist()}
        return {**self.params.to_dict(), **self.options, "runtime": self.runtime, "splat": self.splat, **learned}

    def for_runtime(self, runtime):
        """The same CRF traced for ``runtime`` (the splat that is exact and fastest there)."""
        return PortableCRF(runtime=runtime, params=self.params, compatibility=self.compatibility, **self.options)

    def __call__(self, probabilities, images):
        from deeplab_keras.crf.portable import crf_postprocess

        pixels = tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)
        options = {**self.options, "splat": self.splat}
        return crf_postprocess(probabilities, pixels, self.params, compatibility=self.compatibility,
                               **options)["probabilities"]


def split_crf_head(model, crf):
    """``(model, crf)`` to export: a model with its own CRF on top (``model.crf_head``, e.g. a learned one) becomes
    its network without the CRF plus the same CRF from stock ops (its learned weights and compatibility).

    Raises:
        ExportError: such a model and a ``crf`` hook as well.
    """
    head = getattr(model, "crf_head", None)
    if head is None:
        return model, crf
    if crf is not None:
        raise ExportError("the model has its own CRF on top (model.crf, e.g. a learned one); export it without a "
                          "second CRF (drop --crf / crf=)")
    return model.without_crf(), PortableCRF(params=head.learned_params, compatibility=head.learned_compatibility)


def crf_for(crf, runtime):
    """``crf.for_runtime(runtime)`` when the hook supports it, else ``crf`` itself (any stock-op callable)."""
    return crf.for_runtime(runtime) if hasattr(crf, "for_runtime") else crf
