"""Dense prediction from logits: the one logits resize, multi-scale and flip test-time averaging.

Every place that turns logits at output stride into a full-resolution map goes through :func:`upsample_logits`:
the training loss and metric (``deeplab_keras.train``), ``deeplab-eval`` (``deeplab_keras.evaluate``),
``deeplab-predict`` (:func:`predict_probabilities`) and the graphs ``deeplab-export`` writes
(``deeplab_keras.export.common.serving_outputs``). It is a **corner-aligned** bilinear resize
(``align_corners=True``, the geometry of Caffe's Interp layer that DeepLab v2 used): with output stride 8 a
513 px input gives 65 logits and logit ``i`` sits on pixel ``8 * i`` ((65 - 1) * 8 = 512), so the first and last
logits land exactly on the first and last pixels. The half-pixel resize of ``tf.image.resize`` shifts the map
by a few pixels against that geometry (measured with the tiny_cpu demo model on its 40 held-out synthetic
images: mIoU 0.858 with the half-pixel resize, 0.893 corner-aligned).

The multi-scale test inputs are resized the same way (:func:`scale_images`). TFLite carries the resize as
``RESIZE_BILINEAR`` with ``align_corners=true`` and tf2onnx as ``Resize`` with
``coordinate_transformation_mode="align_corners"`` (both checked by the export tests).
"""
import numpy as np
import tensorflow as tf

__all__ = ["upsample_logits", "scale_images", "Predictor", "predict_probabilities"]


def upsample_logits(logits, size):
    """Resizes ``[N, h, w, C]`` logits at output stride to ``size`` ``(H, W)``: corner-aligned bilinear, float32.

    The single logits resize of the package (training loss and metric, evaluation, ``deeplab-predict``, exported
    graphs), so that all of them see the same full-resolution logits; :func:`scale_images` uses it for the
    test-time input scales too. The output's corner pixels equal the input's exactly (``align_corners=True``,
    ``half_pixel_centers=False``).

    Args:
        logits: float (any precision) or integer tensor ``[N, h, w, C]``.
        size: ``(H, W)``: int pair or int32 tensor.
    Returns:
        float32 tensor ``[N, H, W, C]``.

    Example:
        >>> logits = model(images)                                   # doctest: +SKIP
        >>> full = upsample_logits(logits, tf.shape(images)[1:3])   # doctest: +SKIP
    """
    return tf.raw_ops.ResizeBilinear(images=tf.cast(logits, tf.float32), size=tf.cast(size, tf.int32),
                                     align_corners=True, half_pixel_centers=False)


def scale_images(images, scale):
    """Test-time input scaling: ``images`` ``[N, H, W, 3]`` resized (corner-aligned bilinear, float32) by ``scale``
    to ``max(round(H * scale), 1)`` x ``max(round(W * scale), 1)``; returned as float32 unchanged at scale 1."""
    images = tf.cast(images, tf.float32)
    if float(scale) == 1.0:
        return images
    size = tf.cast(tf.shape(images)[1:3], tf.float32) * float(scale)
    return upsample_logits(images, tf.maximum(tf.cast(tf.round(size), tf.int32), 1))


def _check_scales(scales):
    if not scales or any(float(s) <= 0 for s in scales):
        raise ValueError(f"scales={tuple(scales) if scales else scales!r}: give one or more positive scales, "
                         "e.g. (1.0,) or (0.5, 0.75, 1.0, 1.25, 1.5)")
    return tuple(float(s) for s in scales)


class Predictor:
    """Full-resolution softmax probabilities, averaged over test scales and flips; one ``tf.function`` for every
    image size (for loops over many images, e.g. ``deeplab_keras.evaluate``).

    Args:
        model: a DeepLab-style keras model (float RGB 0..255 in, logits at output stride out).
        scales: input scales to average over.
        flip: also average over the horizontally flipped input.

    Example:
        >>> predictor = Predictor(model, scales=(0.75, 1.0, 1.25), flip=True)   # doctest: +SKIP
        >>> probs = predictor(images).numpy()                                    # doctest: +SKIP
    """

    def __init__(self, model, scales=(1.0,), flip=False):
        self.model = model
        self.scales = _check_scales(scales)
        self.flip = bool(flip)
        self._fn = tf.function(self.probabilities,
                               input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
                               reduce_retracing=True)

    def probabilities(self, images):
        """The computation, eager or traced: float ``[N, H, W, 3]`` -> float32 tensor ``[N, H, W, C]``.

        Raises:
            tf.errors.InvalidArgumentError: the images hold NaN or Inf (they would give NaN probabilities).
        """
        images = tf.debugging.assert_all_finite(
            tf.cast(images, tf.float32), "images hold NaN or Inf pixel values: give RGB values in 0..255")
        size = tf.shape(images)[1:3]
        total = None
        for scale in self.scales:
            x = scale_images(images, scale)
            for flipped in ((False, True) if self.flip else (False,)):
                inp = tf.reverse(x, [2]) if flipped else x
                logits = tf.cast(self.model(inp, training=False), tf.float32)
                if flipped:
                    logits = tf.reverse(logits, [2])
                probs = tf.nn.softmax(upsample_logits(logits, size), axis=-1)
                total = probs if total is None else total + probs
        return total / float(len(self.scales) * (2 if self.flip else 1))

    def __call__(self, images):
        """Traced probabilities of ``images`` ``[N, H, W, 3]`` (float32 tensor)."""
        return self._fn(tf.cast(images, tf.float32))


def predict_probabilities(model, images, scales=(1.0,), flip=False):
    """Softmax probabilities at the input size, averaged over test scales (and horizontal flips).

    Logits are upsampled with :func:`upsample_logits`; scaled inputs come from :func:`scale_images`.

    Args:
        model: a DeepLab-style keras model (float32 RGB 0..255 in, logits at a lower resolution out).
        images: ``[N, H, W, 3]`` (or one ``[H, W, 3]`` image, returned as a batch of one) uint8 or float RGB 0..255.
        scales: input scales to average over (the paper's multi-scale testing uses e.g. 0.5..1.5).
        flip: also average over the horizontally flipped input.

    Returns:
        float32 numpy array [N, H, W, C].

    Example:
        >>> probs = predict_probabilities(model, images, scales=(0.75, 1.0, 1.25), flip=True)  # doctest: +SKIP
    """
    images = np.asarray(images, dtype=np.float32)
    if not np.isfinite(images).all():
        raise ValueError(f"images hold {int((~np.isfinite(images)).sum())} NaN or Inf values (shape "
                         f"{images.shape}): give RGB values in 0..255")
    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
        images = images[None]
    return Predictor(model, scales, flip).probabilities(images).numpy()  # eager: no tracing for a one-off call
