"""Helpers shared by the backbones: stride -> dilation, widths, Caffe's ceil-mode pooling and its size rule."""
import keras

from deeplab_keras.architecture import check_output_stride


def strides_and_dilations(output_stride, num_stages):
    """Per-stage (stride, dilation) for the last ``num_stages`` downsampling stages, as in DeepLab / timm.

    A stage that would push the stride past ``output_stride`` keeps stride 1 and multiplies the dilation by 2
    instead, so every later stage sees the field of view it had in the ImageNet network.

    Args:
        output_stride: 8, 16 or 32.
        num_stages: number of stride-2 stages that follow the stride-4 stem (3 for ResNet: conv3..conv5).

    Returns:
        list of ``(stride, dilation)`` tuples, one per stage.

    Example:
        >>> strides_and_dilations(8, 3)
        [(2, 1), (1, 2), (1, 4)]
    """
    check_output_stride(output_stride)
    stride_so_far, dilation, out = 4, 1, []
    for _ in range(num_stages):
        if stride_so_far * 2 > output_stride:
            dilation *= 2
            out.append((1, dilation))
        else:
            stride_so_far *= 2
            out.append((2, dilation))
    return out


def scaled(filters, width_multiplier):
    """Channel count scaled by ``width_multiplier`` (at least 1)."""
    return max(1, int(round(filters * width_multiplier)))


def caffe_max_pool(x, name):
    """Caffe's ``MAX 3x3, stride 2, pad 1`` pooling, which rounds the output size **up** (ceil mode):
    ``ceil((n - 1) / 2) + 1`` (375 -> 189, 188 -> 95). Padding one row/column in front and two behind and pooling
    without padding gives exactly Caffe's windows; the zero padding never wins the max because the input is a ReLU
    output (>= 0), as everywhere DeepLab pools.

    Args:
        x: Keras tensor [N, H, W, C] of non-negative values.
        name: layer name prefix (``<name>_pad`` and ``<name>``).
    """
    x = keras.layers.ZeroPadding2D(((1, 2), (1, 2)), name=f"{name}_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name=name)(x)


def caffe_pool_size(n):
    """Output size of :func:`caffe_max_pool` for an input of size ``n``."""
    return -(-(n - 1) // 2) + 1


def strided_conv_size(n):
    """Output size of a stride-2 convolution with Caffe's arithmetic (1x1 pad 0, 3x3 pad 1, 7x7 pad 3)."""
    return (n - 1) // 2 + 1
