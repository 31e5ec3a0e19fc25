"""Input normalisation and resizing layers used inside the model (no Lambda layers, so `.keras` files load
with ``safe_mode=True``)."""
import keras
from keras import ops

# keras.applications "caffe" mode (ResNet50/101 v1 and VGG16): RGB -> BGR, minus the ImageNet BGR mean.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="deeplab_keras")
class CaffePreprocess(keras.layers.Layer):
    """RGB 0..255 -> BGR minus the ImageNet mean, as ``keras.applications.resnet.preprocess_input``.

    Args:
        mean_bgr: per-channel mean subtracted after the RGB -> BGR flip.
    """

    def __init__(self, mean_bgr=IMAGENET_MEAN_BGR, **kwargs):
        super().__init__(**kwargs)
        self.mean_bgr = tuple(float(m) for m in mean_bgr)

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        return ops.flip(images, axis=-1) - ops.convert_to_tensor(self.mean_bgr, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean_bgr": self.mean_bgr}


@keras.saving.register_keras_serializable(package="deeplab_keras")
class ResizeByScale(keras.layers.Layer):
    """Bilinear resize by a factor: output size ``round(H * scale)``, ``round(W * scale)`` (at least 1).

    Args:
        scale: resize factor (> 0).
    """

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, images):
        shape = ops.shape(images)
        size = [ops.maximum(ops.cast(ops.round(ops.cast(shape[i], "float32") * self.scale), "int32"), 1)
                for i in (1, 2)]
        return ops.image.resize(images, size, interpolation="bilinear")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, None, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="deeplab_keras")
class ResizeLike(keras.layers.Layer):
    """Bilinear resize of ``inputs[0]`` to the spatial size of ``inputs[1]``."""

    def call(self, inputs):
        images, reference = inputs
        shape = ops.shape(reference)
        return ops.image.resize(images, (shape[1], shape[2]), interpolation="bilinear")

    def compute_output_shape(self, input_shape):
        images, reference = input_shape
        return (images[0], reference[1], reference[2], images[3])
