"""``dense_crf``: the fully connected CRF op (C++ permutohedral lattice) from Python."""
import os
import re

import tensorflow as tf

from deeplab_keras.crf._loader import load_library
from deeplab_keras.crf.params import CRFParams

INPUT_TYPES = ("probs", "unary", "logits")
MAX_LABELS = 1024
MAX_PIXELS = 1 << 26
MAX_VALUES = 1 << 30
PROB_CLIP = 1e-5
PROB_SUM_TOLERANCE = 1e-2  # |sum of a pixel's probabilities - 1| accepted (a float16 / bfloat16 softmax passes)
MAX_MEMORY_ENV = "DEEPLAB_KERAS_CRF_MAX_MEMORY"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def dense_crf(probs, images, params=None, *, input_type="probs", compatibility=None, max_memory=None, name=None,
              save_marginals=False, **overrides):
    """Mean-field inference in a fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011).

    Same semantics and parameters as pydensecrf (``DenseCRF2D``): unary ``U = -log(clip(p, 1e-5, 1))``
    (``pydensecrf.utils.unary_from_softmax``), ``Q = softmax(-U)``, then per iteration
    ``Q <- softmax(-U + bilateral_weight * Kb(Q) + gaussian_weight * Kg(Q))`` (Potts compatibility) where
    ``Kb`` is a Gaussian on ``(x/bilateral_xy_std, y/bilateral_xy_std, rgb/bilateral_rgb_std)`` and ``Kg`` on
    ``(x/gaussian_xy_std, y/gaussian_xy_std)``, both through a permutohedral lattice with symmetric
    normalisation, i.e. ``addPairwiseBilateral(sxy, srgb, rgbim, compat)`` + ``addPairwiseGaussian(sxy,
    compat)``. The parameters are a :class:`CRFParams` (defaults: DeepLab v2 ResNet-101's). Runs on CPU, batched
    and parallel over TensorFlow's intra-op thread pool (``tf.config.threading``); the result does not depend on
    the number of threads. With a ``compatibility`` matrix ``mu`` the update is
    ``Q <- softmax(-U - mu (bilateral_weight * Kb(Q) + gaussian_weight * Kg(Q)))`` (Potts is ``mu = 1 - I``, up
    to float rounding; without it the Potts update runs bit for bit as before). For a
    power-of-two ``gaussian_xy_std <= 1`` (the default 1) the Gaussian kernel's lattice filter is applied as its
    exact per-column pixel stencil (equal up to float rounding); that kernel depends only on the image size and
    is built once per batch and cached for later calls.

    Differentiable (a registered C++ gradient, ``DenseCrfGrad``) w.r.t. ``probs`` (for every ``input_type``),
    ``bilateral_weight`` and ``gaussian_weight`` when they are tensors, and ``compatibility``; not w.r.t. the
    Gaussian widths or ``iterations``. The backward pass filters with the transposed lattice filters (same
    lattices, blur directions reversed) through every iteration; it needs each iteration's marginals:
    ``save_marginals=True`` keeps them from the forward pass (``4 * N*H*W*C * iterations`` bytes more, counted
    in the memory check), otherwise the gradient recomputes the forward pass first (about one forward more).
    A kernel of weight 0 is left out, so its weight's gradient is 0.

    Memory: before allocating, the op estimates what it needs (``memory_estimate``: the output plus one image's
    lattices and mean-field buffers; 0.7 KB per pixel at 21 labels, for 0.35 - 0.4 KB measured on photos) and
    fails with InvalidArgument above ``max_memory``; once the bilateral lattice is built (its size depends on the
    image) it checks again with the real size. It needs less than pydensecrf (peak RSS growth at 21 labels, 1000x750:
    275 vs 338 MiB; 2000x1500: 993 vs 1315 MiB; ``benchmarks/crf_vs_pydensecrf.py``).

    Args:
        probs: float [N, H, W, C] class probabilities (e.g. a softmax resized to the image size); with
            ``input_type="unary"`` unary energies, with ``"logits"`` logits (``U = -logits``). Cast to float32.
            1 <= C <= 1024; every value finite; probabilities >= 0 and summing to 1 over C at every pixel
            (within ``PROB_SUM_TOLERANCE``).
        images: uint8 [N, H, W, 3] RGB images, the same N, H, W as ``probs`` (H * W <= 2**26 and
            H * W * C <= 2**30 per image: tile larger inputs).
        params: a :class:`CRFParams`, a dict of some of its fields, or None (the defaults).
        input_type: "probs", "unary" or "logits": what ``probs`` holds.
        max_memory: bytes the op may allocate: an int, a string such as ``"32G"`` or ``"500M"``, or
            ``"unlimited"``; None reads ``$DEEPLAB_KERAS_CRF_MAX_MEMORY`` (same forms) and otherwise uses 80 % of
            the memory available when the op runs (``MemAvailable``, or the cgroup's allowance when lower).
        compatibility: None (Potts) or a float [C, C] label compatibility ``mu`` (|values| <= 1e6).
        name: optional op name.
        save_marginals: keep every iteration's marginals for a fast gradient (see above).
        **overrides: :class:`CRFParams` fields replacing those of ``params`` (``iterations=5``). A value may also
            be a scalar tensor (e.g. a ``tf.Variable`` weight); the kernel checks it when it runs.

    Returns:
        float32 [N, H, W, C] refined probabilities.

    Raises:
        tf.errors.InvalidArgumentError: wrong rank, mismatched N/H/W, C out of range, non-uint8 images, an empty
            image, non-finite (or negative) inputs, probabilities that do not sum to 1, parameters out of range,
            an estimated memory need above ``max_memory`` (the message gives the estimate and how to lower it).
            Parameters given as Python numbers are checked by :class:`CRFParams` before the op runs (its message).
            In a ``tf.function`` with static shapes, shape problems surface as ValueError at trace time.
        deeplab_keras.crf.OpLibraryError: the op library is not built and cannot be built here.

    Example:
        >>> import numpy as np, deeplab_keras as dk
        >>> probs = np.full((1, 4, 5, 2), 0.5, "float32")
        >>> images = np.zeros((1, 4, 5, 3), "uint8")
        >>> dk.crf.dense_crf(probs, images).shape
        TensorShape([1, 4, 5, 2])
        >>> dk.crf.dense_crf(probs, images, dk.crf.CRFParams(iterations=5), gaussian_weight=0).shape
        TensorShape([1, 4, 5, 2])
    """
    values = _op_params(params, overrides)
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
    limit = memory_limit(max_memory)
    compat = tf.zeros([0], tf.float32) if compatibility is None else tf.cast(compatibility, tf.float32)
    # Every parameter and attribute is passed: CRFParams is the one source of the values (the op has no defaults).
    refined, _ = load_library().dense_crf(tf.cast(probs, tf.float32), images, **values, compatibility=compat,
                                          input_type=input_type, max_memory=limit,
                                          save_marginals=bool(save_marginals), name=name)
    return refined


def _op_params(params, overrides):
    """The op's parameter inputs: ``params`` with ``overrides`` as a :class:`CRFParams`, except that tensor
    overrides pass through as they are (the kernel validates them). A bad value raises InvalidArgumentError, the
    error the kernel gives for a bad tensor value."""
    tensors = {key: value for key, value in overrides.items() if tf.is_tensor(value)}
    numbers = {key: value for key, value in overrides.items() if key not in tensors}
    try:
        CRFParams.from_dict(dict.fromkeys(tensors, 1))  # names an unknown key
        values = CRFParams.resolve(params, **numbers).to_dict()
    except ValueError as err:
        raise tf.errors.InvalidArgumentError(None, None, f"dense_crf: {err}") from None
    # Python numbers stay numbers: with `iterations` as an int32 tensor the call's peak memory grows by about one
    # copy of `probs` (measured at 1000x750x21: +60 MiB; cause not investigated).
    values.update({key: tf.cast(value, tf.int32 if key == "iterations" else tf.float32)
                   for key, value in tensors.items()})
    return values


def memory_limit(max_memory=None):
    """The op's ``max_memory`` attribute for a ``dense_crf(max_memory=...)`` argument: bytes, 0 for no limit, -1
    for the default (80 % of the memory available at run time).

    Args:
        max_memory: None (``$DEEPLAB_KERAS_CRF_MAX_MEMORY`` if set, else the default), an int of bytes > 0, a
            string ``"<number>[K|M|G|T]"`` (binary units) or ``"unlimited"``.
    Raises:
        ValueError: an unreadable value (naming the argument or the environment variable).

    Example:
        >>> memory_limit("1.5G")
        1610612736
    """
    source = "max_memory"
    if max_memory is None:
        max_memory = os.environ.get(MAX_MEMORY_ENV, "").strip() or None
        source = f"${MAX_MEMORY_ENV}"
        if max_memory is None:
            return -1
    if isinstance(max_memory, str):
        text = max_memory.strip().upper()
        if text in ("UNLIMITED", "NONE", "INF"):
            return 0
        match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)I?B?", text)
        if not match:
            raise ValueError(f"dense_crf: {source}={max_memory!r} is not a size; give bytes or e.g. '16G', '500M', "
                             "'unlimited'")
        max_memory = float(match.group(1)) * _UNITS[match.group(2)]
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory >= 1:
        raise ValueError(f"dense_crf: {source} must be a number of bytes >= 1 (or 'unlimited'), got {max_memory!r}")
    return int(min(max_memory, 2 ** 62))


def memory_estimate(shape, params=None, *, bilateral_points=None, **overrides):
    """Bytes ``dense_crf`` estimates it needs for ``probs`` of ``shape`` (what it checks against its limit).

    Before the bilateral lattice is built its size is unknown: the op assumes 2 lattice points per pixel (VOC
    photos at DeepLab's parameters have 0.5 .. 2.1; noise-like images up to 6) and checks again with the real
    size once the lattice is built, before the mean-field buffers are allocated.

    Args:
        shape: ``[N, H, W, C]``.
        params: a :class:`CRFParams`, a dict of some of its fields, or None (the defaults), as in ``dense_crf``.
        bilateral_points: the bilateral lattice's number of points, if known (the op's second check).
        **overrides: :class:`CRFParams` fields replacing those of ``params``.
    Returns:
        ``(estimate, default_limit)`` in bytes; ``default_limit`` is the limit used when neither ``max_memory`` nor
        ``$DEEPLAB_KERAS_CRF_MAX_MEMORY`` is given (80 % of the memory available now; -1 if unknown).

    Raises:
        ValueError: a bad parameter (:class:`CRFParams`'s message).

    Example:
        >>> estimate, limit = memory_estimate([1, 750, 1000, 21])       # doctest: +SKIP
    """
    p = CRFParams.resolve(params, **overrides)
    estimate, limit = load_library().dense_crf_memory_estimate(
        tf.constant([int(v) for v in shape], tf.int64), p.iterations, p.bilateral_weight, p.gaussian_weight,
        p.gaussian_xy_std, tf.constant(-1 if bilateral_points is None else int(bilateral_points), tf.int64))
    return int(estimate), int(limit)


def _dense_crf_grad(op, grad, grad_marginals):  # noqa: ARG001 (the marginals are an internal output)
    """The registered gradient of the DenseCrf op: the C++ DenseCrfGrad (see ``dense_crf``)."""
    grads = load_library().dense_crf_grad(
        *op.inputs, op.outputs[0], op.outputs[1], grad, input_type=op.get_attr("input_type"),
        max_memory=op.get_attr("max_memory"))
    d_probs, d_bilateral, d_gaussian, d_compat = grads
    return [d_probs, None, None, d_bilateral, None, None, d_gaussian, None, d_compat]


try:
    tf.RegisterGradient("DenseCrf")(_dense_crf_grad)
except KeyError:  # already registered (module reloaded)
    pass
