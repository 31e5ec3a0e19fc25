"""Keras layer over the dense-CRF op (``deeplab_keras.crf.dense_crf``).

This module imports Keras but not TensorFlow (the op wrapper loads when a layer is made), so ``deeplab_keras.crf``
registers the layer's Keras name on import and ``.keras`` files holding it load.
"""
import keras

from deeplab_keras.crf.params import CRFParams


MIN_LEARNED_WEIGHT = 1e-4  # a learned kernel weight stays above this (at 0 the op leaves the kernel out)


@keras.saving.register_keras_serializable(package="deeplab_keras")
class KernelWeightConstraint(keras.constraints.Constraint):
    """Keeps a learned CRF kernel weight in ``[MIN_LEARNED_WEIGHT, MAX_WEIGHT]`` (the op's range; at 0 the op
    leaves the kernel out and its gradient is 0)."""

    def __call__(self, w):
        from deeplab_keras.crf.params import MAX_WEIGHT

        return keras.ops.clip(w, MIN_LEARNED_WEIGHT, MAX_WEIGHT)


@keras.saving.register_keras_serializable(package="deeplab_keras")
class CompatibilityConstraint(keras.constraints.Constraint):
    """Keeps a learned label compatibility symmetric, ``(mu + mu^T) / 2``, within the op's ``|mu| <= 1e6``: mean
    field minimises an energy whose pairwise term is ``mu(l, l') k(f_i, f_j)``, symmetric in the two pixels."""

    def __call__(self, w):
        from deeplab_keras.crf.params import MAX_WEIGHT

        return keras.ops.clip(0.5 * (w + keras.ops.transpose(w)), -MAX_WEIGHT, MAX_WEIGHT)


def _potts(shape, dtype=None):
    """Potts compatibility ``1 - I`` (the op's update without a compatibility, up to float rounding)."""
    return keras.ops.ones(shape, dtype=dtype) - keras.ops.eye(shape[0], dtype=dtype)


@keras.saving.register_keras_serializable(package="deeplab_keras")
class DenseCRF(keras.layers.Layer):
    """Fully connected CRF mean-field inference as a layer: ``[probs, images] -> refined probs``.

    Use it after a model's softmax resized to the image size. Parameters and semantics are those of
    :func:`deeplab_keras.crf.dense_crf` (pydensecrf's); defaults are :class:`CRFParams`'s (DeepLab v2
    ResNet-101's). It always computes in float32 (also under a mixed-precision policy), is differentiable w.r.t.
    its first input (the op's registered gradient) and is not XLA-compilable (custom CPU op). It works eagerly,
    in ``tf.function`` and in functional models; the op library is loaded on the first call, not when the layer
    is built.

    ``trainable=True`` makes a CRF that learns (CRF-as-RNN, Zheng et al. 2015): the two kernel weights (initial
    values from ``params``, kept in ``[1e-4, 1e6]``) and, with ``learn_compatibility``, a symmetric C x C label
    compatibility (initially Potts ``1 - I``) become weights, trained through the op's gradient; the Gaussian
    widths stay fixed. While training, the op keeps every iteration's marginals for the backward pass
    (``4 * H*W*C * iterations`` bytes per image). The learned values are in the layer's weights (``.keras``
    files); :attr:`learned_params` and :attr:`learned_compatibility` read them, and :meth:`portable` gives the
    same CRF from stock TF ops for export.

    Args:
        params: a :class:`CRFParams`, a dict of some of its fields, or None (the defaults).
        input_type: what the first input holds: "probs" (default), "unary" or "logits".
        max_memory: bytes the op may allocate (int, or a string such as "16G"); None: the op's default
            (``$DEEPLAB_KERAS_CRF_MAX_MEMORY``, else 80 % of the memory available).
        learned: whether the layer holds learnable weights; None: ``trainable`` (a trained layer frozen later
            keeps its weights: its config says ``learned=True``).
        learn_compatibility: with ``learned``, also learn the label compatibility (needs a known C).
        **kwargs: :class:`CRFParams` fields replacing those of ``params`` (``iterations=5``), and base Layer
            arguments (name, trainable, ...).

    Call args:
        inputs: ``[probs, images]``: float [N, H, W, C] and [N, H, W, 3] RGB images, uint8 or float in 0..255
            (float images are rounded and clipped to uint8).

    Raises:
        ValueError: a bad parameter (:class:`CRFParams`'s message), ``input_type`` or ``max_memory``.

    Example:
        >>> import numpy as np, deeplab_keras as dk
        >>> layer = dk.crf.DenseCRF(dk.crf.CRFParams(iterations=5))
        >>> probs = np.full((1, 8, 8, 2), 0.5, "float32")
        >>> layer([probs, np.zeros((1, 8, 8, 3), "uint8")]).shape
        TensorShape([1, 8, 8, 2])
    """

    def __init__(self, params=None, input_type="probs", max_memory=None, learned=None, learn_compatibility=True,
                 **kwargs):
        from deeplab_keras.crf.ops import INPUT_TYPES, memory_limit

        overrides = {key: kwargs.pop(key) for key in CRFParams.keys() if key in kwargs}
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.learned = bool(kwargs["trainable"] if learned is None else learned)
        self.learn_compatibility = bool(learn_compatibility)
        try:
            self.params = CRFParams.resolve(params, **overrides)
        except ValueError as err:
            raise ValueError(f"DenseCRF: {err}") from None
        if input_type not in INPUT_TYPES:
            raise ValueError(f"DenseCRF: input_type must be one of {INPUT_TYPES}, got {input_type!r}")
        self.input_type = input_type
        memory_limit(max_memory)  # an unreadable value fails here, not at the first call
        self.max_memory = max_memory
        self.supports_jit = False

    @staticmethod
    def _split(inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError("DenseCRF expects inputs [probs, images] (a list of two tensors), got "
                             f"{type(inputs).__name__}")
        return inputs

    def build(self, input_shape):
        if self.learned:
            constraint = KernelWeightConstraint()
            for name in ("bilateral_weight", "gaussian_weight"):
                value = getattr(self.params, name)
                setattr(self, f"{name}_variable", self.add_weight(
                    shape=(), initializer=keras.initializers.Constant(max(value, MIN_LEARNED_WEIGHT)),
                    constraint=constraint, name=name))
            self.compatibility = None
            if self.learn_compatibility:
                classes = self._split(input_shape)[0][-1]
                if classes is None:
                    raise ValueError("DenseCRF(learn_compatibility=True) needs the number of classes (the last axis "
                                     "of the first input) to be known when it is built")
                self.compatibility = self.add_weight(shape=(classes, classes), initializer=_potts,
                                                     constraint=CompatibilityConstraint(), name="compatibility")
        self.built = True

    def call(self, inputs, training=None):
        import tensorflow as tf

        from deeplab_keras.crf.ops import dense_crf

        probs, images = self._split(inputs)
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8:
            images = tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0.0, 255.0), tf.uint8)
        return dense_crf(probs, images, self.params, input_type=self.input_type, max_memory=self.max_memory,
                         save_marginals=bool(training) and self.trainable, **self._learned_tensors())

    def _learned_tensors(self):
        """The op's learned inputs (kernel weights, compatibility) as tensors; {} when nothing is learned."""
        if not self.learned:
            return {}
        values = {name: keras.ops.convert_to_tensor(getattr(self, f"{name}_variable"))
                  for name in ("bilateral_weight", "gaussian_weight")}
        if self.compatibility is not None:
            values["compatibility"] = keras.ops.convert_to_tensor(self.compatibility)
        return values

    @property
    def learned_params(self):
        """:class:`CRFParams` with the current (learned) kernel weights; ``params`` when nothing is learned."""
        if not self.learned:
            return self.params
        return CRFParams.resolve(
            self.params, **{name: float(keras.ops.convert_to_numpy(getattr(self, f"{name}_variable")))
                            for name in ("bilateral_weight", "gaussian_weight")})

    @property
    def learned_compatibility(self):
        """The learned C x C compatibility as a numpy array, or None (Potts)."""
        if not self.learned or self.compatibility is None:
            return None
        return keras.ops.convert_to_numpy(self.compatibility)

    def portable(self, runtime=None, **options):
        """This CRF (learned values included) from stock TF ops: ``fn(probs, images) -> refined`` over
        :func:`deeplab_keras.crf.dense_crf_portable` (for exported graphs).

        Args:
            runtime, **options: ``dense_crf_portable`` options (``runtime``, ``splat``, ``gaussian_filter``).
        """
        from deeplab_keras.crf.portable import dense_crf_portable

        params, compat = self.learned_params, self.learned_compatibility

        def crf(probs, images):
            return dense_crf_portable(probs, images, params, runtime=runtime, compatibility=compat, **options)

        return crf

    def compute_output_shape(self, input_shape):
        return tuple(self._split(input_shape)[0])

    def compute_output_spec(self, inputs):
        probs, _ = self._split(inputs)
        return keras.KerasTensor(probs.shape, dtype="float32")

    def get_config(self):
        """The base config plus the :class:`CRFParams` fields (flat, as files saved by earlier versions hold
        them), ``input_type`` and ``max_memory``."""
        config = super().get_config()
        config.update(self.params.to_dict(), input_type=self.input_type, max_memory=self.max_memory,
                      learned=self.learned, learn_compatibility=self.learn_compatibility)
        return config


@keras.saving.register_keras_serializable(package="deeplab_keras")
class CRFHead(DenseCRF):
    """A dense CRF on top of a segmentation network: ``[logits at output stride, images] -> log-probabilities at the
    image size`` (the logits upsampled corner-aligned, their softmax refined by :class:`DenseCRF`, then
    ``log(max(Q, 1e-12))``), so losses and metrics written for logits apply to the CRF output unchanged
    (``softmax(log Q) = Q``). Arguments as :class:`DenseCRF` (``input_type`` is "probs": DeepLab's unary
    ``-log(clip(p, 1e-5, 1))``, the same as the exported portable CRF).

    Example:
        >>> import numpy as np, deeplab_keras as dk
        >>> head = dk.crf.CRFHead(dk.crf.CRFParams(iterations=2), trainable=True)
        >>> head([np.zeros((1, 3, 3, 2), "float32"), np.zeros((1, 17, 17, 3), "uint8")]).shape
        TensorShape([1, 17, 17, 2])
    """

    LOG_FLOOR = 1e-12

    def __init__(self, params=None, **kwargs):
        kwargs["input_type"] = "probs"
        super().__init__(params, **kwargs)

    def call(self, inputs, training=None):
        import tensorflow as tf

        from deeplab_keras.inference import upsample_logits

        logits, images = self._split(inputs)
        probs = tf.nn.softmax(upsample_logits(logits, tf.shape(images)[1:3]), axis=-1)
        refined = super().call([probs, images], training=training)
        return tf.math.log(tf.maximum(refined, self.LOG_FLOOR))

    def compute_output_shape(self, input_shape):
        logits, images = self._split(input_shape)
        return tuple(images[:3]) + (logits[-1],)

    def compute_output_spec(self, inputs):
        logits, images = self._split(inputs)
        return keras.KerasTensor(tuple(images.shape[:3]) + (logits.shape[-1],), dtype="float32")
