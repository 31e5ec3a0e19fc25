"""Keras layer over the dense-CRF op (``deeplab_keras.crf.dense_crf``)."""
import keras
import tensorflow as tf

from deeplab_keras.crf.ops import INPUT_TYPES, dense_crf, memory_limit


@keras.saving.register_keras_serializable(package="deeplab_keras")
class DenseCRF(keras.layers.Layer):
    """Fully connected CRF mean-field inference as a layer: ``[probs, images] -> refined probs``.

    Use it after a model's softmax resized to the image size. Parameters and semantics are those of
    :func:`deeplab_keras.crf.dense_crf` (pydensecrf's); defaults are DeepLab v2 ResNet-101's. The layer has no
    weights, always computes in float32 (also under a mixed-precision policy), is not differentiable and is not
    XLA-compilable (custom CPU op). It works eagerly, in ``tf.function`` and in functional models; the op
    library is loaded on the first call, not when the layer is built.

    Args:
        iterations: mean-field iterations (>= 0).
        bilateral_weight, bilateral_xy_std, bilateral_rgb_std: appearance kernel weight and standard deviations.
        gaussian_weight, gaussian_xy_std: smoothness kernel weight and standard deviation.
        input_type: what the first input holds: "probs" (default), "unary" or "logits".
        max_memory: bytes the op may allocate (int, or a string such as "16G"); None: the op's default
            (``$DEEPLAB_KERAS_CRF_MAX_MEMORY``, else 80 % of the memory available).
        **kwargs: base Layer arguments (name, ...).

    Call args:
        inputs: ``[probs, images]``: float [N, H, W, C] and [N, H, W, 3] RGB images, uint8 or float in 0..255
            (float images are rounded and clipped to uint8).

    Example:
        >>> import numpy as np, deeplab_keras as dk
        >>> layer = dk.crf.DenseCRF(iterations=5)
        >>> probs = np.full((1, 8, 8, 2), 0.5, "float32")
        >>> layer([probs, np.zeros((1, 8, 8, 3), "uint8")]).shape
        TensorShape([1, 8, 8, 2])
    """

    def __init__(self, iterations=10, bilateral_weight=4.0, bilateral_xy_std=67.0, bilateral_rgb_std=3.0,
                 gaussian_weight=3.0, gaussian_xy_std=1.0, input_type="probs", max_memory=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"DenseCRF: iterations must be an int >= 0, got {iterations!r}")
        for arg, value, positive in (("bilateral_weight", bilateral_weight, False),
                                     ("bilateral_xy_std", bilateral_xy_std, True),
                                     ("bilateral_rgb_std", bilateral_rgb_std, True),
                                     ("gaussian_weight", gaussian_weight, False),
                                     ("gaussian_xy_std", gaussian_xy_std, True)):
            if not isinstance(value, (int, float)) or not (value > 0 if positive else value >= 0):
                raise ValueError(f"DenseCRF: {arg} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
        if input_type not in INPUT_TYPES:
            raise ValueError(f"DenseCRF: input_type must be one of {INPUT_TYPES}, got {input_type!r}")
        self.iterations = iterations
        self.bilateral_weight = float(bilateral_weight)
        self.bilateral_xy_std = float(bilateral_xy_std)
        self.bilateral_rgb_std = float(bilateral_rgb_std)
        self.gaussian_weight = float(gaussian_weight)
        self.gaussian_xy_std = float(gaussian_xy_std)
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
        probs, images = self._split(inputs)
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8:
            images = tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0.0, 255.0), tf.uint8)
        return dense_crf(probs, images, iterations=self.iterations, bilateral_weight=self.bilateral_weight,
                         bilateral_xy_std=self.bilateral_xy_std, bilateral_rgb_std=self.bilateral_rgb_std,
                         gaussian_weight=self.gaussian_weight, gaussian_xy_std=self.gaussian_xy_std,
                         input_type=self.input_type, max_memory=self.max_memory)

    def compute_output_shape(self, input_shape):
        return tuple(self._split(input_shape)[0])

    def compute_output_spec(self, inputs):
        probs, _ = self._split(inputs)
        return keras.KerasTensor(probs.shape, dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(iterations=self.iterations, bilateral_weight=self.bilateral_weight,
                      bilateral_xy_std=self.bilateral_xy_std, bilateral_rgb_std=self.bilateral_rgb_std,
                      gaussian_weight=self.gaussian_weight, gaussian_xy_std=self.gaussian_xy_std,
                      input_type=self.input_type, max_memory=self.max_memory)
        return config
