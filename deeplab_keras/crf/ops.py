"""``dense_crf``: the fully connected CRF op (C++ permutohedral lattice) from Python."""
import operator

import tensorflow as tf

from deeplab_keras.crf import _loader

INPUT_TYPES = ("probs", "unary", "logits")
MAX_LABELS = 1024
MAX_PIXELS = 1 << 26
MAX_VALUES = 1 << 30
PROB_CLIP = 1e-5


def dense_crf(probs, images, iterations=10, bilateral_weight=4.0, bilateral_xy_std=67.0, bilateral_rgb_std=3.0,
              gaussian_weight=3.0, gaussian_xy_std=1.0, input_type="probs", name=None):
    """Mean-field inference in a fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011).

    Same semantics and parameters as pydensecrf (``DenseCRF2D``): unary ``U = -log(clip(p, 1e-5, 1))``
    (``pydensecrf.utils.unary_from_softmax``), ``Q = softmax(-U)``, then per iteration
    ``Q <- softmax(-U + bilateral_weight * Kb(Q) + gaussian_weight * Kg(Q))`` (Potts compatibility) where
    ``Kb`` is a Gaussian on ``(x/bilateral_xy_std, y/bilateral_xy_std, rgb/bilateral_rgb_std)`` and ``Kg`` on
    ``(x/gaussian_xy_std, y/gaussian_xy_std)``, both through a permutohedral lattice with symmetric
    normalisation, i.e. ``addPairwiseBilateral(sxy, srgb, rgbim, compat)`` + ``addPairwiseGaussian(sxy,
    compat)``. Defaults are DeepLab v2 ResNet-101's. Runs on CPU, batched and parallel over TensorFlow's
    intra-op thread pool (``tf.config.threading``); the result does not depend on the number of threads. For a
    power-of-two ``gaussian_xy_std <= 1`` (the default 1) the Gaussian kernel's lattice filter is applied as its
    exact per-column pixel stencil (equal up to float rounding); that kernel depends only on the image size and
    is built once per batch and cached for later calls. Not differentiable.

    Args:
        probs: float [N, H, W, C] class probabilities (e.g. a softmax resized to the image size); with
            ``input_type="unary"`` unary energies, with ``"logits"`` logits (``U = -logits``). Cast to float32.
            1 <= C <= 1024; every value finite (and >= 0 for probabilities).
        images: uint8 [N, H, W, 3] RGB images, the same N, H, W as ``probs`` (H * W <= 2**26 and
            H * W * C <= 2**30 per image: tile larger inputs).
        iterations: mean-field iterations, >= 0 (0 returns ``softmax(-U)``).
        bilateral_weight: weight (``compat``) of the appearance kernel, >= 0.
        bilateral_xy_std: its spatial standard deviation in pixels, > 0.
        bilateral_rgb_std: its colour standard deviation in intensity levels, > 0.
        gaussian_weight: weight of the smoothness kernel, >= 0.
        gaussian_xy_std: its spatial standard deviation in pixels, > 0.
        input_type: "probs", "unary" or "logits": what ``probs`` holds.
        name: optional op name.

    Returns:
        float32 [N, H, W, C] refined probabilities.

    Raises:
        tf.errors.InvalidArgumentError: wrong rank, mismatched N/H/W, C out of range, non-uint8 images, an empty
            image, non-finite (or negative) inputs, parameters out of range. In a ``tf.function`` with static
            shapes, shape problems surface as ValueError at trace time.
        deeplab_keras.crf.OpLibraryError: the op library is not built and cannot be built here.

    Example:
        >>> import numpy as np, deeplab_keras as dk
        >>> probs = np.full((1, 4, 5, 2), 0.5, "float32")
        >>> images = np.zeros((1, 4, 5, 3), "uint8")
        >>> dk.crf.dense_crf(probs, images).shape
        TensorShape([1, 4, 5, 2])
    """
    if input_type not in INPUT_TYPES:
        raise ValueError(f"dense_crf: input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    probs = tf.convert_to_tensor(probs)
    images = tf.convert_to_tensor(images)
    if not probs.dtype.is_floating:
        raise tf.errors.InvalidArgumentError(
            None, None, f"dense_crf: `probs` must be a float tensor [N, H, W, C], got dtype {probs.dtype.name}")
    if images.dtype != tf.uint8:
        raise tf.errors.InvalidArgumentError(
            None, None,
            f"dense_crf: `images` must be uint8 [N, H, W, 3] (RGB 0..255), got dtype {images.dtype.name}; convert "
            "with tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)")
    library = _loader.load_library()
    return library.dense_crf(
        tf.cast(probs, tf.float32), images,
        iterations=_int(iterations),
        bilateral_weight=_float(bilateral_weight), bilateral_xy_std=_float(bilateral_xy_std),
        bilateral_rgb_std=_float(bilateral_rgb_std), gaussian_weight=_float(gaussian_weight),
        gaussian_xy_std=_float(gaussian_xy_std), input_type=input_type, name=name)


def _float(value):
    return tf.cast(value, tf.float32)


def _int(value):
    if tf.is_tensor(value) or isinstance(value, tf.Variable):
        return tf.cast(value, tf.int32)
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"dense_crf: iterations must be an integer, got {value!r}") from None


def _no_gradient(op, grad):  # noqa: ARG001
    raise LookupError(
        "dense_crf (DenseCrf op) is not differentiable: it is an inference-time post-processing step. Apply it "
        "outside tf.GradientTape / model training, or to tf.stop_gradient(probs).")


try:
    tf.RegisterGradient("DenseCrf")(_no_gradient)
except KeyError:  # already registered (module reloaded)
    pass
