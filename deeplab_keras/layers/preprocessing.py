"""Input normalisation and the Caffe ``Interp`` resize used inside the model (no Lambda layers, so `.keras` files
load with ``safe_mode=True``). Every op here is a Keras op: the layers run on any Keras 3 backend."""
import keras
from keras import ops

from deeplab_keras.architecture import interp_factors

# DeepLab v2's mean colour (the released Caffe models and every port): B, G, R subtracted after RGB -> BGR.
DEEPLAB_MEAN_BGR = (104.008, 116.669, 122.675)
DEEPLAB_MEAN_RGB = DEEPLAB_MEAN_BGR[::-1]
# keras.applications "caffe" mode (ResNet50/101 v1 and VGG16 ImageNet weights), kept for reference.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="deeplab_keras")
class CaffePreprocess(keras.layers.Layer):
    """RGB 0..255 -> BGR minus the mean colour (DeepLab v2's by default), as the released Caffe models expect.

    Args:
        mean_bgr: per-channel mean subtracted after the RGB -> BGR flip.

    Example:
        >>> import numpy as np
        >>> CaffePreprocess()(np.full((1, 2, 2, 3), 122.675, "float32"))[0, 0, 0, 0]   # doctest: +SKIP
    """

    def __init__(self, mean_bgr=DEEPLAB_MEAN_BGR, **kwargs):
        super().__init__(**kwargs)
        self.mean_bgr = tuple(float(m) for m in mean_bgr)

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        return ops.flip(images, axis=-1) - ops.convert_to_tensor(self.mean_bgr, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean_bgr": self.mean_bgr}


def interp_size(size, scale):
    """Size after Caffe's Interp with ``scale`` = zoom/shrink: ``n = (size - 1) // shrink + 1``, then
    ``(n - 1) * zoom + 1`` (513 -> 385 at 0.75 and 257 at 0.5; 321 -> 241 and 161; 500 -> 373 and 250).

    Works on ints and on integer tensors.

    Example:
        >>> interp_size(513, 0.75)
        385
    """
    zoom, shrink = interp_factors(scale)
    return ((size - 1) // shrink) * zoom + 1


def _interp_matrix(n_in, n_out, dtype):
    """[n_out, n_in] weights of corner-aligned linear interpolation (output i samples input i*(n_in-1)/(n_out-1))."""
    n_in_f = ops.cast(n_in, "float32")
    n_out_f = ops.cast(n_out, "float32")
    step = ops.where(n_out_f > 1, (n_in_f - 1) / ops.maximum(n_out_f - 1, 1), 0.0)
    pos = ops.cast(ops.arange(n_out), "float32") * step
    taps = ops.cast(ops.arange(n_in), "float32")
    weights = ops.relu(1.0 - ops.abs(ops.expand_dims(pos, 1) - ops.expand_dims(taps, 0)))
    return ops.cast(weights, dtype)


def resize_aligned(images, size):
    """Bilinear resize of ``[N, H, W, C]`` to ``size`` ``(h, w)`` with aligned corners (Caffe's Interp,
    ``align_corners=True``), as two small matrix products: backend-free and exactly linear.

    Args:
        images: float tensor ``[N, H, W, C]``.
        size: ``(h, w)`` ints or integer scalar tensors.

    Example:
        >>> import numpy as np
        >>> resize_aligned(np.zeros((1, 5, 5, 2), "float32"), (9, 9)).shape
        TensorShape([1, 9, 9, 2])
    """
    shape = ops.shape(images)
    rows = _interp_matrix(shape[1], size[0], images.dtype)            # [h, H]
    cols = _interp_matrix(shape[2], size[1], images.dtype)            # [w, W]
    x = ops.matmul(rows, ops.transpose(images, (0, 2, 1, 3)))          # [N, W, h, C]
    return ops.matmul(cols, ops.transpose(x, (0, 2, 1, 3)))            # [N, h, w, C]


@keras.saving.register_keras_serializable(package="deeplab_keras")
class CaffeInterp(keras.layers.Layer):
    """Caffe ``Interp`` by a scale (zoom/shrink): size :func:`interp_size`, corner-aligned bilinear.

    The released DeepLab v2 MSC nets shrink their input this way (0.75: shrink 4, zoom 3; 0.5: shrink 2).

    Args:
        scale: resize factor, a ratio of small integers (e.g. 0.75, 0.5).

    Example:
        >>> import numpy as np
        >>> CaffeInterp(0.75)(np.zeros((1, 513, 513, 3), "float32")).shape
        TensorShape([1, 385, 385, 3])
    """

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        interp_factors(self.scale)

    def call(self, images):
        shape = ops.shape(images)
        return resize_aligned(images, (interp_size(shape[1], self.scale), interp_size(shape[2], self.scale)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, None, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="deeplab_keras")
class ResizeLike(keras.layers.Layer):
    """Corner-aligned bilinear resize of ``inputs[0]`` to the spatial size of ``inputs[1]`` (Caffe's Interp to a
    reference blob: how the released MSC nets bring each scale's logits to the scale-1 size)."""

    def call(self, inputs):
        images, reference = inputs
        shape = ops.shape(reference)
        return resize_aligned(images, (shape[1], shape[2]))

    def compute_output_shape(self, input_shape):
        images, reference = input_shape
        return (images[0], reference[1], reference[2], images[3])
