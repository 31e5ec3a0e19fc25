"""Atrous ResNet-50/101 (bottleneck v1) with the geometry of the released DeepLab v2 Caffe models and
keras.applications layer names (so ImageNet weights transfer by name).

Stem: conv1 7x7/2 pad 3, then pool1 MAX 3x3/2 pad 1 with Caffe's ceil rounding (keras.applications pads 1 and
rounds down: the two agree only when conv1's output size is odd, i.e. H mod 4 in {1, 2}, such as 321 or 513; at
other sizes Caffe's grid has one more row/column). The stride of conv3/4/5 sits on the first 1x1 conv and its
shortcut, as in Caffe. Output stride 8: conv4 dilation 2, conv5 dilation 4; 16: conv5 dilation 2; 32: the plain
ImageNet network. Batch norm epsilon defaults to Caffe's 1e-5 (keras.applications uses 1.001e-5).
"""
import keras

from deeplab_keras.architecture import CAFFE_BN_EPSILON, RESNET_BLOCKS
from deeplab_keras.backbones.atrous import (caffe_max_pool, caffe_pool_size, scaled, strided_conv_size,
                                            strides_and_dilations)


def bottleneck(x, filters, stride=1, dilation=1, conv_shortcut=False, bn_epsilon=CAFFE_BN_EPSILON, name=""):
    """ResNet v1 bottleneck (1x1 -> 3x3 dilated -> 1x1, x4 expansion); the stride sits on the first 1x1 conv
    as in keras.applications / Caffe."""
    layers = keras.layers
    if conv_shortcut:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = layers.BatchNormalization(epsilon=bn_epsilon, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = layers.BatchNormalization(epsilon=bn_epsilon, name=f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, name=f"{name}_2_conv")(x)
    x = layers.BatchNormalization(epsilon=bn_epsilon, name=f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = layers.BatchNormalization(epsilon=bn_epsilon, name=f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def resnet_features(x, depth="resnet101", output_stride=8, width_multiplier=1.0, stage_blocks=None,
                    bn_epsilon=CAFFE_BN_EPSILON):
    """Apply an atrous ResNet to the (preprocessed) tensor ``x`` and return the conv5 features.

    Args:
        x: Keras tensor [N, H, W, 3], caffe-normalised BGR.
        depth: "resnet50" or "resnet101".
        output_stride: 8, 16 or 32.
        width_multiplier: scales every width (1.0 = the paper; 0.125 for tiny test models).
        stage_blocks: blocks per stage (conv2..conv5); default (3,4,6,3) / (3,4,23,3).
        bn_epsilon: batch-norm epsilon (Caffe: 1e-5).

    Returns:
        Keras tensor [N, h, w, 2048 * width_multiplier], ``h`` = :func:`resnet_output_size` ``(H, output_stride)``.
    """
    layers = keras.layers
    blocks = tuple(stage_blocks) if stage_blocks is not None else RESNET_BLOCKS[depth]
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(scaled(64, width_multiplier), 7, strides=2, name="conv1_conv")(x)
    x = layers.BatchNormalization(epsilon=bn_epsilon, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = caffe_max_pool(x, "pool1_pool")
    plan = [(1, 1)] + strides_and_dilations(output_stride, 3)
    for stage, (filters, n, (stride, dilation)) in enumerate(zip((64, 128, 256, 512), blocks, plan), start=2):
        for i in range(1, n + 1):
            x = bottleneck(x, scaled(filters, width_multiplier), stride=stride if i == 1 else 1,
                           dilation=dilation, conv_shortcut=(i == 1), bn_epsilon=bn_epsilon,
                           name=f"conv{stage}_block{i}")
    return x


def resnet_output_size(n, output_stride=8):
    """Feature-map size of the atrous ResNet for an input side ``n`` (Caffe's arithmetic).

    Example:
        >>> [resnet_output_size(n) for n in (321, 366, 375, 500, 513)]
        [41, 46, 48, 63, 65]
    """
    n = caffe_pool_size(strided_conv_size(n))
    for stride, _ in strides_and_dilations(output_stride, 3):
        if stride == 2:
            n = strided_conv_size(n)
    return n
