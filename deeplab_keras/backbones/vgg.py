"""VGG-16 as in DeepLab-LargeFOV: 3x3 max pooling (stride 2 on pool1..3, stride 1 on pool4/5 at output stride
8) and conv5 dilated by 2. Conv layers carry keras.applications' names (``block1_conv1`` ...) so ImageNet
weights transfer; the fc6/fc7/fc8 head lives in :class:`deeplab_keras.layers.aspp.ASPP`."""
import keras

from deeplab_keras.backbones.common import check_output_stride, scaled

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def vgg16_features(x, output_stride=8, width_multiplier=1.0):
    """Apply the DeepLab VGG-16 trunk (conv1_1 .. pool5) to ``x``.

    Args:
        x: Keras tensor [N, H, W, 3], caffe-normalised BGR.
        output_stride: 8 (DeepLab), 16 or 32.
        width_multiplier: scales every width.

    Returns:
        Keras tensor [N, ceil(H/OS), ceil(W/OS), 512 * width_multiplier].
    """
    check_output_stride(output_stride)
    strided_pools = {8: 3, 16: 4, 32: 5}[output_stride]
    dilation = 1
    for b, (filters, n) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, n + 1):
            x = keras.layers.Conv2D(scaled(filters, width_multiplier), 3, padding="same", activation="relu",
                                    dilation_rate=dilation, name=f"block{b}_conv{i}")(x)
        stride = 2 if b <= strided_pools else 1
        if stride == 1:
            dilation *= 2
        x = keras.layers.MaxPooling2D(3, strides=stride, padding="same", name=f"block{b}_pool")(x)
    return x
