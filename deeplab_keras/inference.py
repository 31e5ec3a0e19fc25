"""Dense prediction from logits: the one logits resize, multi-scale and flip test-time averaging.

Every place that turns logits at output stride into a full-resolution map goes through :func:`upsample_logits`:
the training loss and metric (``deeplab_keras.train``), ``deeplab-eval`` (``deeplab_keras.evaluate``),
``deeplab-predict`` (:func:`predict_probabilities`) and the graphs ``deeplab-export`` writes
(``deeplab_keras.export.serving.serving_outputs``). It is a **corner-aligned** bilinear resize
(``align_corners=True``, the geometry of Caffe's Interp layer that DeepLab v2 used): with output stride 8 a
513 px input gives 65 logits and logit ``i`` sits on pixel ``8 * i`` ((65 - 1) * 8 = 512), so the first and last
logits land exactly on the first and last pixels. The half-pixel resize of ``tf.image.resize`` shifts the map
by a few pixels against that geometry (measured with the tiny_cpu demo model on its 40 held-out synthetic
images: mIoU 0.858 with the half-pixel resize, 0.893 corner-aligned).

The multi-scale test inputs are resized the same way (:func:`scale_images`). TFLite carries the resize as
``RESIZE_BILINEAR`` with ``align_corners=true`` and tf2onnx as ``Resize`` with
``coordinate_transformation_mode="align_corners"`` (both checked by the export tests).

**Tiled inference** (:func:`tiled_probabilities`; ``tile_size=`` of :class:`Predictor` and
:func:`predict_probabilities`, ``--tile H[xW] --tile-overlap F`` of ``deeplab eval`` / ``deeplab predict``) runs an
image larger than the network should take at once as overlapping tiles and blends their probabilities, so the
network's memory is that of one tile (the stitched ``[N, H, W, C]`` probabilities are the only full-size array).
Along each axis the tiles are spaced evenly from the first to the last pixel, at most ``tile * (1 - overlap)``
apart; each tile's probabilities are weighted by a separable window that rises linearly over the overlap width
from each tile edge (``min(1, d / (overlap_px + 1))`` for a pixel ``d`` pixels from the edge, ``d >= 1``: never
zero) and every pixel is divided by the sum of its weights, so a pixel's probabilities come mostly from the tiles
where it lies far from an edge. A tile that covers the image is one call on the whole image: exactly the untiled
result. Test scales, flips and a model's own MSC apply inside each tile; the CRF runs afterwards on the stitched
probabilities.

**The graph** (``graph=`` of :class:`Predictor` and :func:`predict_probabilities`): by default the model runs in the
inference form of ``deeplab_keras.graph_rewrite`` (the one the exports use): native dilated convolutions instead of
Keras' SpaceToBatchND + Conv2D + BatchToSpaceND, batch norm folded into the convolution before it, the ResNet ASPP
head as one matmul and shifted sums. The folded weights are computed in the graph from the model's variables at
every call, so a Predictor (and its traced function) reused after the weights changed computes with the new ones;
a bf16 Predictor reads them from the float32 model too. Probabilities differ from Keras' own graph
(``graph="plain"``) by rounding only (max |diff| 5e-5 on the random-weight ResNet-101 at 513x513, labels equal);
measured on the shared 2 cores, ResNet-101 at 513x513, it takes 0.85x of the plain graph's time in float32 and
0.80x in bf16 with one thread per runtime (0.7-0.95x in loaded 2-thread runs; ``benchmarks/network.py``'s ``tf`` /
``tf_plain`` and ``tf_bf16`` / ``tf_bf16_plain`` rows, README).
"""
import contextlib

import numpy as np
import tensorflow as tf

from deeplab_keras.config_base import is_int

__all__ = ["upsample_logits", "scale_images", "Predictor", "predict_probabilities", "tiled_probabilities",
           "check_tiling", "tile_starts", "DEFAULT_TILE_OVERLAP"]

DEFAULT_TILE_OVERLAP = 0.25  # the fraction of a tile that overlaps its neighbour when tile_overlap is not given
GRAPHS = ("rewritten", "plain")  # Predictor(graph=...)
# The ResNet ASPP head of Predictor's rewritten graph. Measured (ResNet-101, 513x513, 5 interleaved rounds on the
# shared 2-core machine, two runs): float32 the same time either way (1.00x, 1.01x); bf16 fused 0.51x / 0.48x of
# float32's time, the plain head 0.50x / 0.58x.
PREDICTOR_ASPP_HEAD = "fused"


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


def check_tiling(tile_size, tile_overlap=DEFAULT_TILE_OVERLAP):
    """``(tile_size, tile_overlap)`` checked: ``((h, w), overlap)``, or ``(None, overlap)`` for no tiling.

    Args:
        tile_size: None, an int (square tiles) or ``(h, w)``; each side >= 33 px
            (``deeplab_keras.architecture.MIN_INPUT_SIZE``).
        tile_overlap: fraction of a tile shared with its neighbour, in [0, 1); None: :data:`DEFAULT_TILE_OVERLAP`.

    Raises:
        ValueError: naming ``tile_size`` / ``tile_overlap`` and what is allowed.

    Example:
        >>> check_tiling(321, 0.5)
        ((321, 321), 0.5)
    """
    from deeplab_keras.architecture import MIN_INPUT_SIZE

    overlap = DEFAULT_TILE_OVERLAP if tile_overlap is None else tile_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float, np.number)) or not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile_overlap={tile_overlap!r} must be in [0, 1) (a fraction of the tile, e.g. 0.25)")
    if tile_size is None:
        return None, float(overlap)
    size = (tile_size, tile_size) if np.ndim(tile_size) == 0 else tuple(np.ravel(tile_size))
    if len(size) != 2 or not all(is_int(v) and v >= MIN_INPUT_SIZE for v in size):
        raise ValueError(f"tile_size={tile_size!r} must be an int or (height, width), each >= {MIN_INPUT_SIZE} px "
                         "(e.g. 513 or (513, 1025))")
    return (int(size[0]), int(size[1])), float(overlap)


def tile_starts(length, tile, overlap):
    """First pixels of the tiles along an axis of ``length`` px: evenly spaced from 0 to ``length - tile``, at most
    ``tile * (1 - overlap)`` apart (one tile, at 0, when ``tile >= length``).

    Example:
        >>> tile_starts(100, 40, 0.25), tile_starts(30, 40, 0.25)
        ([0, 30, 60], [0])
    """
    if tile >= length:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    count = -(-(length - tile) // stride) + 1
    return [int(v) for v in np.round(np.linspace(0, length - tile, count))]


def _window(tile, overlap):
    """The blending weights along one tile axis: a linear rise over the overlap width from each edge, never 0."""
    ramp = tile - max(1, int(tile * (1.0 - overlap)))
    d = np.minimum(np.arange(tile), np.arange(tile)[::-1]) + 1
    return np.minimum(1.0, d / (ramp + 1.0)).astype(np.float32)


def tiled_probabilities(fn, images, tile_size, tile_overlap=DEFAULT_TILE_OVERLAP):
    """Probabilities of ``images`` computed tile by tile with ``fn`` and blended (see the module docstring).

    Args:
        fn: ``float32 [N, h, w, 3] -> [N, h, w, C]`` probabilities (numpy or tensor), e.g. a :class:`Predictor`.
        images: ``[N, H, W, 3]`` RGB 0..255.
        tile_size: an int or ``(h, w)`` (clipped to the image); a tile that covers the image calls ``fn`` once on
            the whole image.
        tile_overlap: fraction of a tile shared with its neighbour, in [0, 1).

    Returns:
        float32 numpy array ``[N, H, W, C]``.

    Example:
        >>> probs = tiled_probabilities(Predictor(model), images, (513, 513), 0.25)   # doctest: +SKIP
    """
    (tile_h, tile_w), overlap = check_tiling(tile_size, tile_overlap)
    images = np.asarray(images)  # dtype kept: a SavedModel takes uint8 tiles
    height, width = images.shape[1:3]
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    if (tile_h, tile_w) == (height, width):
        return np.asarray(fn(images), np.float32)
    weight = _window(tile_h, overlap)[:, None] * _window(tile_w, overlap)[None, :]
    total, weights = None, np.zeros((height, width), np.float32)
    for top in tile_starts(height, tile_h, overlap):
        for left in tile_starts(width, tile_w, overlap):
            probs = np.asarray(fn(images[:, top:top + tile_h, left:left + tile_w]), np.float32)
            if total is None:
                total = np.zeros(images.shape[:3] + probs.shape[-1:], np.float32)
            total[:, top:top + tile_h, left:left + tile_w] += probs * weight[None, :, :, None]
            weights[top:top + tile_h, left:left + tile_w] += weight
    total /= weights[None, :, :, None]
    return total


class Predictor:
    """Full-resolution softmax probabilities, averaged over test scales and flips; one ``tf.function`` for every
    image size (for loops over many images, e.g. ``deeplab_keras.evaluate``).

    Args:
        model: a DeepLab-style keras model (float RGB 0..255 in, logits at output stride out).
        scales: input scales to average over.
        flip: also average over the horizontally flipped input.
        tile_size: None (the whole image at once), or an int / ``(h, w)``: :meth:`numpy` runs tiles of this size
            (:func:`tiled_probabilities`).
        tile_overlap: fraction of a tile shared with its neighbour, in [0, 1).
        precision: "float32" (None) or "bf16": run a bfloat16 copy of the model on a CPU with native bfloat16
            (``deeplab_keras.precision.with_precision``; refused with a ValueError elsewhere).
        graph: ``"rewritten"`` (default): run the inference graph of ``deeplab_keras.graph_rewrite`` (native dilated
            convolutions, batch norm folded from the model's current weights at every call, ResNet ASPP head
            fused; a bf16 copy reads the model's current float32 weights too); ``"plain"``: Keras' own graph of the
            model, e.g. to debug or to compare with it exactly. A model that is not a Keras layer runs plainly.

    Attributes:
        rewrite: the ``GraphRewrite`` entered around the model's calls, or None (``graph="plain"``).

    Example:
        >>> predictor = Predictor(model, scales=(0.75, 1.0, 1.25), flip=True)   # doctest: +SKIP
        >>> probs = predictor(images).numpy()                                    # doctest: +SKIP
        >>> probs = Predictor(model, tile_size=513).numpy(big_images)            # doctest: +SKIP
    """

    def __init__(self, model, scales=(1.0,), flip=False, tile_size=None, tile_overlap=DEFAULT_TILE_OVERLAP, *,
                 precision=None, graph="rewritten"):
        import keras

        from deeplab_keras.graph_rewrite import GraphRewrite
        from deeplab_keras.precision import with_precision

        if graph not in GRAPHS:
            raise ValueError(f"graph={graph!r} must be one of {', '.join(GRAPHS)}")
        self.model = with_precision(model, precision)
        self.rewrite = None
        if graph == "rewritten" and isinstance(model, keras.layers.Layer):
            self.rewrite = GraphRewrite(self.model, aspp_head=PREDICTOR_ASPP_HEAD, weights="live",
                                        source=None if self.model is model else model)
        self.scales = _check_scales(scales)
        self.flip = bool(flip)
        self.tile_size, self.tile_overlap = check_tiling(tile_size, tile_overlap)
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
        with self.rewrite or contextlib.nullcontext():  # the folded weights are computed once per call
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
        """Traced probabilities of ``images`` ``[N, H, W, 3]`` (float32 tensor; the whole image at once)."""
        return self._fn(tf.cast(images, tf.float32))

    def numpy(self, images):
        """Probabilities of ``images`` ``[N, H, W, 3]`` as a float32 numpy array, tile by tile when ``tile_size``
        is set (each tile traced, so tiles of one size share one trace)."""
        if self.tile_size is None:
            return self(images).numpy()
        return tiled_probabilities(lambda tile: self(tile).numpy(), images, self.tile_size, self.tile_overlap)


def predict_probabilities(model, images, scales=(1.0,), flip=False, tile_size=None,
                          tile_overlap=DEFAULT_TILE_OVERLAP, *, precision=None, graph="rewritten"):
    """Softmax probabilities at the input size, averaged over test scales (and horizontal flips).

    Logits are upsampled with :func:`upsample_logits`; scaled inputs come from :func:`scale_images`.

    Args:
        model: a DeepLab-style keras model (float32 RGB 0..255 in, logits at a lower resolution out).
        images: ``[N, H, W, 3]`` (or one ``[H, W, 3]`` image, returned as a batch of one) uint8 or float RGB 0..255.
        scales: input scales to average over (the paper's multi-scale testing uses e.g. 0.5..1.5).
        flip: also average over the horizontally flipped input.
        tile_size: None (the whole image at once), or an int / ``(h, w)``: run overlapping tiles of this size and
            blend them (:func:`tiled_probabilities`); a tile that covers the image gives exactly the whole-image
            result.
        tile_overlap: fraction of a tile shared with its neighbour, in [0, 1).
        precision: "float32" (None) or "bf16" (see :class:`Predictor`).
        graph: "rewritten" (default) or "plain" (see :class:`Predictor`).

    Returns:
        float32 numpy array [N, H, W, C].

    Example:
        >>> probs = predict_probabilities(model, images, scales=(0.75, 1.0, 1.25), flip=True)  # doctest: +SKIP
        >>> probs = predict_probabilities(model, big_images, tile_size=(513, 513), tile_overlap=0.25)  # doctest: +SKIP
    """
    images = np.asarray(images, dtype=np.float32)
    if not np.isfinite(images).all():
        raise ValueError(f"images hold {int((~np.isfinite(images)).sum())} NaN or Inf values (shape "
                         f"{images.shape}): give RGB values in 0..255")
    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
        images = images[None]
    predictor = Predictor(model, scales, flip, tile_size, tile_overlap, precision=precision, graph=graph)
    if predictor.tile_size is None:
        return predictor.probabilities(images).numpy()  # eager: no tracing for a one-off call
    return tiled_probabilities(lambda tile: predictor.probabilities(tile).numpy(), images.numpy(),
                               predictor.tile_size, predictor.tile_overlap)
