"""Dense CRF from stock TensorFlow ops: exports to TF Serving, LiteRT (builtins only) and ONNX.

Same mean-field inference as ``deeplab_keras.crf.dense_crf`` (the C++ op) and Kraehenbuehl's
``densecrf`` / pydensecrf: unary ``U = -log(clip(p, 1e-5, 1))``, ``Q = softmax(-U)``, then per iteration

    Q <- softmax(-U + sum_k w_k * n_k * K_k(n_k * Q)),    n_k = 1 / sqrt(K_k(1))

(Potts compatibility, symmetric normalisation, the filters include the centre pixel). ``K_bilateral`` is a
Gaussian on (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) and ``K_gaussian`` a Gaussian on (x/sxy, y/sxy).

The filters are densecrf's permutohedral lattice built from stock ops (:mod:`deeplab_keras.crf.lattice`, which
says why and how). For the Gaussian (x, y) kernel, ``gaussian_filter="lattice"`` (default) is densecrf's 2-D
lattice; ``"exact"`` is the exact separable Gaussian (two depthwise convolutions, radius ``ceil(3 sxy)``):
cheaper, but not what pydensecrf computes (its 2-D lattice only approximates the Gaussian at sxy = 1; measured
99.98 % label agreement instead of 100 %).

Images of any size and batch size run through one graph (all shapes are dynamic); iterations are unrolled
at trace time. Limits: packed keys need < 2^62.5 (``lattice_key_bits``; ~42 bits for a VOC image at the
defaults; the eager call raises above the limit), and < 2^28 lattice vertices per call.

Reference quirk: pydensecrf's SSE lattice pads the last block of 4 pixels with phantom points at feature 0
when H * W % 4 != 0; their vertices slightly change the blur near that corner of feature space (up to
2e-4 on the filter). This implementation has no phantom points; compare on images with H * W % 4 == 0.
"""
import numpy as np
import tensorflow as tf

from deeplab_keras.crf.lattice import Lattice as _Lattice, LatticeKernel, SeparableKernel
from deeplab_keras.crf.ops import PROB_SUM_TOLERANCE
from deeplab_keras.crf.params import CRFParams

__all__ = ["dense_crf_portable", "crf_postprocess", "lattice_key_bits", "SPLAT_MODES", "RUNTIME_SPLAT"]

SPLAT_MODES = ("cumsum", "scatter", "segment_sum")
#: Fastest exact splat per target runtime (None: a graph that is exact in all of them).
RUNTIME_SPLAT = {None: "cumsum", "tf": "scatter", "litert": "segment_sum", "onnx": "cumsum"}


def _check_args(gaussian_filter, runtime, splat):
    """Refuses an unknown ``gaussian_filter``, ``runtime`` or ``splat`` (one ValueError naming the option)."""
    if gaussian_filter not in ("lattice", "exact"):
        raise ValueError(f"`gaussian_filter` must be 'lattice' or 'exact'; got {gaussian_filter!r}.")
    if runtime not in RUNTIME_SPLAT:
        raise ValueError(f"`runtime` must be one of {list(RUNTIME_SPLAT)}; got {runtime!r}.")
    if splat is not None and splat not in SPLAT_MODES:
        raise ValueError(f"`splat` must be None or one of {SPLAT_MODES}; got {splat!r}.")


def dense_crf_portable(probs, images, params=None, *, gaussian_filter="lattice", runtime=None, splat=None,
                       compatibility=None, **overrides):
    """Fully connected CRF mean-field inference built only from stock TF ops.

    Works eagerly and inside ``tf.function``; graphs that contain it convert to LiteRT with
    ``TFLITE_BUILTINS`` only and to ONNX (tf2onnx, opset >= 16). The parameters are a :class:`CRFParams`
    (pydensecrf's meaning; defaults: DeepLab v2 ResNet-101's); its iterations are unrolled into the graph.

    Args:
        probs: float32 [N, H, W, C] or [H, W, C] class probabilities (e.g. a resized softmax): finite, >= 0,
            summing to 1 over C at every pixel (within ``PROB_SUM_TOLERANCE``, like the C++ op); the unary is
            ``-log(clip(probs, 1e-5, 1))`` (pydensecrf's ``unary_from_softmax``; the C++ op's clip).
            C must be known when tracing if ``gaussian_filter="exact"``.
        images: uint8 [N, H, W, 3] or [H, W, 3] RGB images, same N, H, W as ``probs``.
        params: a :class:`CRFParams`, a dict of some of its fields, or None (the defaults).
        gaussian_filter: "lattice" (densecrf's 2-D permutohedral lattice, matches pydensecrf) or "exact"
            (separable Gaussian convolution).
        runtime: the runtime that will execute the graph: None (any: TF, LiteRT and onnxruntime), "tf",
            "litert" or "onnx". It only picks equivalent implementations (same results up to float
            rounding) that are fast and exact there; a graph traced for "tf" or "litert" is wrong in
            onnxruntime (int64 TopK is cast to float32 by tf2onnx; ScatterND(add) races) and the
            "litert" one does not convert to ONNX in reasonable memory. Trace once per target format.
        splat: override the splat form: "cumsum" (exact everywhere), "scatter" (TF, LiteRT) or
            "segment_sum" (TF, LiteRT); None picks ``RUNTIME_SPLAT[runtime]``.
        compatibility: None (Potts) or a float32 [C, C] label compatibility ``mu``: the update is then
            ``softmax(-U - mu (sum_k w_k n_k K_k(n_k Q)))``, as the C++ op's ``compatibility``.
        **overrides: :class:`CRFParams` fields replacing those of ``params`` (``iterations=5``).
            ``bilateral_weight`` and ``gaussian_weight`` may be tensors (e.g. learned weights under
            ``tf.GradientTape``: the graph is differentiable w.r.t. them, ``probs`` and ``compatibility`` with
            ``splat="scatter"`` or ``"segment_sum"``; the "cumsum" splat rounds to integers); a tensor weight's
            kernel is always included.

    Returns:
        float32 tensor shaped like ``probs``: the refined marginals (sum to 1 over C).

    Raises:
        ValueError: a bad parameter (:class:`CRFParams`'s message), option or shape.
        tf.errors.InvalidArgumentError: non-finite, negative or unnormalised ``probs`` (eagerly at the call; in
            a graph when it runs in TensorFlow).
    """
    tensors = {key: overrides.pop(key) for key in ("bilateral_weight", "gaussian_weight")
               if key in overrides and not isinstance(overrides[key], (int, float))}
    params = CRFParams.resolve(params, **overrides)
    weights = {"bilateral_weight": params.bilateral_weight, "gaussian_weight": params.gaussian_weight}
    weights.update({key: tf.cast(value, tf.float32) for key, value in tensors.items()})
    _check_args(gaussian_filter, runtime, splat)
    probs, images, squeeze = _checked_inputs(probs, images, gaussian_filter)
    probs = _validated(probs)
    if compatibility is not None:
        compatibility = tf.cast(compatibility, tf.float32)
        if compatibility.shape.rank != 2 or not compatibility.shape.is_compatible_with([probs.shape[-1]] * 2):
            raise ValueError(f"`compatibility` must be [C, C] with C = {probs.shape[-1]} (the classes of `probs`); "
                             f"got shape {compatibility.shape}.")
    out = _mean_field(probs, images, params, gaussian_filter, splat or RUNTIME_SPLAT[runtime],
                      runtime in ("tf", "litert"), weights, compatibility)
    return out[0] if squeeze else out


def _checked_inputs(probs, images, gaussian_filter):
    """(probs [N, H, W, C], images [N, H, W, 3], squeeze) after the dtype and shape checks; squeeze: 3-D input."""
    probs = tf.convert_to_tensor(probs)
    images = tf.convert_to_tensor(images)
    if probs.dtype != tf.float32:
        raise TypeError(f"`probs` must be float32 [N, H, W, C]; got dtype {probs.dtype.name}. "
                        f"Cast it with tf.cast(probs, tf.float32).")
    if images.dtype != tf.uint8:
        raise TypeError(f"`images` must be uint8 [N, H, W, 3] RGB; got dtype {images.dtype.name}. "
                        f"Convert with tf.cast(tf.clip_by_value(images, 0, 255), tf.uint8).")
    squeeze = probs.shape.rank == 3
    if squeeze:
        probs, images = probs[None], images[None]
    if probs.shape.rank != 4 or images.shape.rank != 4:
        raise ValueError(f"`probs` must be [N, H, W, C] (or [H, W, C]) and `images` [N, H, W, 3]; got "
                         f"shapes {probs.shape} and {images.shape}.")
    if images.shape[-1] is not None and images.shape[-1] != 3:
        raise ValueError(f"`images` must have 3 (RGB) channels; got shape {images.shape}.")
    if not probs.shape[:3].is_compatible_with(images.shape[:3]):
        raise ValueError(f"`probs` and `images` must share N, H, W; got shapes {probs.shape} and "
                         f"{images.shape}.")
    num_channels = probs.shape[-1]
    if 0 in probs.shape[1:].as_list():
        raise ValueError(f"`probs` must have H, W, C > 0; got shape {probs.shape}.")
    if gaussian_filter == "exact" and num_channels is None:
        raise ValueError("gaussian_filter='exact' needs the number of classes (last axis of `probs`) to "
                         "be known when tracing; give the input a static class dimension.")
    return probs, images, squeeze


def _validated(probs):
    """``probs`` after the C++ op's input checks: finite, >= 0, summing to 1 over the classes (within
    ``PROB_SUM_TOLERANCE``). Eagerly a failure raises ``tf.errors.InvalidArgumentError`` naming the first bad
    element; in a graph the checks are ``tf.debugging.Assert`` ops that fail the same way when the graph runs in
    TensorFlow (the LiteRT and ONNX converters drop them: those artifacts return NaN for NaN input instead)."""
    value_ok = tf.logical_and(tf.math.is_finite(probs), probs >= 0)
    sums = tf.reduce_sum(probs, axis=-1)
    sum_ok = tf.abs(sums - 1) <= PROB_SUM_TOLERANCE
    value_rule = "`probs` must be finite and >= 0 (pass probabilities, e.g. softmax outputs)"
    sum_rule = (f"`probs` must sum to 1 over the classes at every pixel (within {PROB_SUM_TOLERANCE}): pass "
                "probabilities (a softmax) or normalise them (probs / sum over the last axis)")
    if tf.executing_eagerly():
        if not bool(tf.reduce_all(value_ok)):
            index = tf.where(tf.logical_not(value_ok))[0].numpy().tolist()
            value = probs[tuple(index)].numpy()
            raise tf.errors.InvalidArgumentError(
                None, None, f"dense_crf_portable: {value_rule}; got {value} at {index}")
        if not bool(tf.reduce_all(sum_ok)):
            index = tf.where(tf.logical_not(sum_ok))[0].numpy().tolist()
            raise tf.errors.InvalidArgumentError(
                None, None, f"dense_crf_portable: {sum_rule}; got a sum of {sums[tuple(index)].numpy():.6g} at "
                            f"[{', '.join(map(str, index))}, :]")
        return probs
    checks = [tf.debugging.Assert(tf.reduce_all(value_ok), [f"dense_crf_portable: {value_rule}"]),
              tf.debugging.Assert(tf.reduce_all(sum_ok), [f"dense_crf_portable: {sum_rule}"])]
    with tf.control_dependencies(checks):
        return tf.identity(probs)


def _mean_field(probs, images, params, gaussian_filter, splat, native_sort, weights, compatibility):
    """The refined marginals [N, H, W, C]: ``params.iterations`` unrolled mean-field updates of checked inputs
    (kernel ``weights`` by name: numbers or tensors; ``compatibility``: None for Potts or [C, C])."""
    shape = tf.shape(probs)
    n, h, w, c = shape[0], shape[1], shape[2], shape[3]
    num_points = n * h * w
    # -U = log(p), with p clipped to [1e-5, 1] like pydensecrf's unary_from_softmax and the C++ op.
    unary_neg = tf.math.log(tf.clip_by_value(tf.reshape(probs, tf.stack([num_points, c])), 1e-5, 1.0))
    x_grid, y_grid, group, rgb = _pixel_features(images, n, h, w)

    def used(weight):
        return tf.is_tensor(weight) or weight > 0

    kernels = []
    if used(weights["bilateral_weight"]):
        feats = _bilateral_features(x_grid, y_grid, rgb, params)
        kernels.append(LatticeKernel(feats, group, weights["bilateral_weight"], splat, native_sort))
    if used(weights["gaussian_weight"]):
        sxy = np.float32(params.gaussian_xy_std)
        if gaussian_filter == "lattice":
            feats = tf.stack([x_grid / sxy, y_grid / sxy], axis=1)
            kernels.append(LatticeKernel(feats, group, weights["gaussian_weight"], splat, native_sort))
        else:
            kernels.append(SeparableKernel(params.gaussian_xy_std, int(probs.shape[-1]), shape,
                                           weights["gaussian_weight"]))

    q = tf.nn.softmax(unary_neg, axis=-1)
    for _ in range(params.iterations):
        q_image = tf.reshape(q, shape) if gaussian_filter == "exact" else None
        terms = [unary_neg]
        for kernel in kernels:
            terms += kernel(q, q_image)
        if compatibility is not None:  # x = -U - mu m, m the weighted kernel terms (m = 0 without kernels)
            message = tf.add_n(terms[1:]) if len(terms) > 1 else tf.zeros_like(unary_neg)
            terms = [unary_neg, -tf.matmul(message, compatibility, transpose_b=True)]
        q = tf.nn.softmax(tf.add_n(terms), axis=-1)
    return tf.reshape(q, shape)


def _pixel_features(images, n, h, w):
    """Per-pixel x, y, image index and RGB of ``images`` [n, h, w, 3], flattened row-major (densecrf's j * W + i)."""
    ys = tf.cast(tf.range(h), tf.float32)
    xs = tf.cast(tf.range(w), tf.float32)
    x_grid = tf.reshape(tf.tile(xs[None, None, :], tf.stack([n, h, 1])), [-1])
    y_grid = tf.reshape(tf.tile(ys[None, :, None], tf.stack([n, 1, w])), [-1])
    group = tf.reshape(tf.tile(tf.range(n)[:, None], tf.stack([1, h * w])), [-1])
    rgb = tf.reshape(tf.cast(images, tf.float32), [-1, 3])
    return x_grid, y_grid, group, rgb


def _bilateral_features(x_grid, y_grid, rgb, params):
    """The bilateral kernel's features [P, 5]: (x, y) / bilateral_xy_std and RGB / bilateral_rgb_std."""
    sxy, srgb = np.float32(params.bilateral_xy_std), np.float32(params.bilateral_rgb_std)
    return tf.concat([tf.stack([x_grid / sxy, y_grid / sxy], axis=1), rgb / srgb], axis=1)


def lattice_key_bits(images, params=None, **overrides):
    """Bits the packed int64 lattice keys of the bilateral kernel need for these images (must be <= 62.5).

    Args:
        images: uint8 [N, H, W, 3].
        params, **overrides: the :class:`CRFParams` (its ``bilateral_xy_std`` and ``bilateral_rgb_std`` count), as
            in ``dense_crf_portable``.

    Returns:
        float, log2 of the key space size.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    xs, ys, group, rgb = _pixel_features(images, shape[0], shape[1], shape[2])
    params = CRFParams.resolve(params, **overrides)
    feats = _bilateral_features(xs, ys, rgb, params)
    return float(_Lattice(feats, group, splat="scatter", native_sort=True, check_bits=False).key_bits)


def crf_postprocess(probabilities, image, params=None, runtime=None, **crf_kwargs):
    """Serving helper: refine a model's resized softmax with the portable CRF and take the labels.

    For export signatures: ``image`` uint8 [N, H, W, 3] and ``probabilities`` float32 [N, H, W, C] at the
    image's size (e.g. ``tf.nn.softmax(deeplab_keras.inference.upsample_logits(logits, [H, W]))``) in, refined
    ``{"labels": int32 [N, H, W], "probabilities": float32 [N, H, W, C]}`` out. Only stock TF ops.
    Trace one function per target format (``runtime``): what is fastest in one runtime can be slow or
    wrong in another.

    Args:
        probabilities: float32 [N, H, W, C] class probabilities at image resolution.
        image: uint8 [N, H, W, 3] RGB image.
        params: a :class:`CRFParams`, a dict of some of its fields, or None (the defaults).
        runtime: the runtime that will execute the traced graph: "tf" (SavedModel / TF Serving),
            "litert" (TFLite builtins), "onnx" (onnxruntime), or None (exact in any of them).
        **crf_kwargs: other ``dense_crf_portable`` arguments (``gaussian_filter``, ``splat``, a learned
            ``compatibility``) and :class:`CRFParams` overrides (``iterations=5``; learned kernel weights).

    Returns:
        dict with "labels" (int32 [N, H, W]) and "probabilities" (float32 [N, H, W, C]).
    """
    refined = dense_crf_portable(probabilities, image, params, runtime=runtime, **crf_kwargs)
    return {"labels": tf.argmax(refined, axis=-1, output_type=tf.int32), "probabilities": refined}
