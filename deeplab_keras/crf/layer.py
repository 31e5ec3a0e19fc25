"""Keras layer over the dense-CRF op (``deeplab_keras.crf.dense_crf``).

This module imports Keras but not TensorFlow (the op wrapper loads when a layer is made), so ``deeplab_keras.crf``
registers the layer's Keras name on import and ``.keras`` files holding it load.
"""
import keras

from deeplab_keras.crf.params import CRFParams


@keras.saving.register_keras_serializable(package="deeplab_keras")
class DenseCRF(keras.layers.Layer):
    """Fully connected CRF mean-field inference as a layer: ``[probs, images] -> refined probs``.

    Use it after a model's softmax resized to the image size. Parameters and semantics are those of
    :func:`deeplab_keras.crf.dense_crf` (pydensecrf's); defaults are :class:`CRFParams`'s (DeepLab v2
    ResNet-101's). The layer has no weights, always computes in float32 (also under a mixed-precision policy), is
    not differentiable and is not XLA-compilable (custom CPU op). It works eagerly, in ``tf.function`` and in
    functional models; the op library is loaded on the first call, not when the layer is built.

    Args:
        params: a :class:`CRFParams`, a dict of some of its fields, or None (the defaults).
        input_type: what the first input holds: "probs" (default), "unary" or "logits".
        max_memory: bytes the op may allocate (int, or a string such as "16G"); None: the op's default
            (``$DEEPLAB_KERAS_CRF_MAX_MEMORY``, else 80 % of the memory available).
        **kwargs: :class:`CRFParams` fields replacing those of ``params`` (``iterations=5``), and base Layer
            arguments (name, ...).

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

    def __init__(self, params=None, input_type="probs", max_memory=None, **kwargs):
        from deeplab_keras.crf.ops import INPUT_TYPES, memory_limit

        overrides = {key: kwargs.pop(key) for key in CRFParams.keys() if key in kwargs}
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
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

    def call(self, inputs):
        import tensorflow as tf

        from deeplab_keras.crf.ops import dense_crf

        probs, images = self._split(inputs)
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8:
            images = tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0.0, 255.0), tf.uint8)
        return dense_crf(probs, images, self.params, input_type=self.input_type, max_memory=self.max_memory)

    def compute_output_shape(self, input_shape):
        return tuple(self._split(input_shape)[0])

    def compute_output_spec(self, inputs):
        probs, _ = self._split(inputs)
        return keras.KerasTensor(probs.shape, dtype="float32")

    def get_config(self):
        """The base config plus the :class:`CRFParams` fields (flat, as files saved by earlier versions hold
        them), ``input_type`` and ``max_memory``."""
        config = super().get_config()
        config.update(self.params.to_dict(), input_type=self.input_type, max_memory=self.max_memory)
        return config
