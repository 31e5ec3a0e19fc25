"""VGG-16 as in DeepLab-LargeFOV / VGG-ASPP (Caffe geometry): pool1..3 MAX 3x3/2 pad 1 with Caffe's ceil rounding,
pool4/5 MAX 3x3/1 pad 1 and conv5 dilated by 2 at output stride 8, then (LargeFOV) ``pool5a`` AVE 3x3/1 pad 1
(Caffe divides by 9 at the border too). Conv layers carry keras.applications' names (``block1_conv1`` ...) so
ImageNet weights transfer; the fc6/fc7/fc8 head lives in :class:`deeplab_keras.layers.aspp.ASPP`."""
import keras

from deeplab_keras.architecture import check_output_stride
from deeplab_keras.backbones.atrous import caffe_max_pool, caffe_pool_size, scaled

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
_STRIDED_POOLS = {8: 3, 16: 4, 32: 5}


def vgg16_features(x, output_stride=8, width_multiplier=1.0, pool5a=True):
    """Apply the DeepLab VGG-16 trunk (conv1_1 .. pool5, optionally pool5a) to ``x``.

    Args:
        x: Keras tensor [N, H, W, 3], caffe-normalised BGR.
        output_stride: 8 (DeepLab), 16 or 32.
        width_multiplier: scales every width.
        pool5a: add DeepLab-LargeFOV's average pooling after pool5.

    Returns:
        Keras tensor [N, h, w, 512 * width_multiplier], ``h`` = :func:`vgg16_output_size` ``(H, output_stride)``.
    """
    check_output_stride(output_stride)
    strided_pools = _STRIDED_POOLS[output_stride]
    dilation = 1
    for b, (filters, n) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, n + 1):
            x = keras.layers.Conv2D(scaled(filters, width_multiplier), 3, padding="same", activation="relu",
                                    dilation_rate=dilation, name=f"block{b}_conv{i}")(x)
        if b <= strided_pools:
            x = caffe_max_pool(x, f"block{b}_pool")
        else:
            dilation *= 2
            x = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"block{b}_pool")(x)
    if pool5a:
        x = keras.layers.ZeroPadding2D(1, name="pool5a_pad")(x)
        x = keras.layers.AveragePooling2D(3, strides=1, name="pool5a")(x)
    return x


def vgg16_output_size(n, output_stride=8):
    """Feature-map size of the DeepLab VGG-16 for an input side ``n`` (366 -> 47, 500 -> 64 at output stride 8)."""
    for _ in range(_STRIDED_POOLS[output_stride]):
        n = caffe_pool_size(n)
    return n
