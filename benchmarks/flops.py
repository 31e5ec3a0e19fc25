"""Analytic FLOP count of a DeepLabV2 (backend-free: Keras shape inference only, no TensorFlow import).

Counts the convolutions (2 FLOPs per multiply-add, biases and element-wise ops left out), which is where the
work is: ResNet-101 ASPP-L at 513x513 is 377.8 GFLOP, at 321x321 150.3 GFLOP; with MSC (1, 0.75, 0.5) every
scale's network is added (513: 689.8 GFLOP). A training step is counted as 3x the forward pass (forward, input
gradients, weight gradients), the usual convention.

Example:
    >>> import deeplab_keras as dk
    >>> model = dk.DeepLabV2(21, "resnet101")                                  # doctest: +SKIP
    >>> round(forward_flops(model, 513, 513) / 1e9, 1)                          # doctest: +SKIP
    377.8
"""
import keras

TRAIN_STEP_FACTOR = 3


def _kernel_flops(conv, out_h, out_w):
    kh, kw, cin, cout = conv.kernel.shape
    return 2 * out_h * out_w * kh * kw * cin * cout // max(1, getattr(conv, "groups", 1))


def network_flops(network, height, width):
    """Convolution FLOPs of the single-scale network (``model.network``) for one ``height x width`` image."""
    aspp = network.get_layer("aspp")
    convs = [layer for layer in network.layers if isinstance(layer, keras.layers.Conv2D)]
    probe = keras.Model(network.inputs, [layer.output for layer in convs] + [aspp.input])
    specs = probe.compute_output_spec(keras.KerasTensor((1, height, width, 3)))
    total = sum(_kernel_flops(conv, spec.shape[1], spec.shape[2]) for conv, spec in zip(convs, specs[:-1]))
    head = specs[-1].shape  # every head conv keeps the feature map's size ("same" padding, stride 1)
    for branch in aspp.branches:
        total += sum(_kernel_flops(layer, head[1], head[2])
                     for layer in branch if isinstance(layer, keras.layers.Conv2D))
    return int(total)


def forward_flops(model, height, width):
    """Convolution FLOPs of ``model`` (a DeepLabV2, MSC included) for one ``height x width`` image."""
    from deeplab_keras.layers.preprocessing import interp_size

    total = 0
    for scale in model.msc_scales or (1.0,):
        h, w = (height, width) if scale == 1.0 else (interp_size(height, scale), interp_size(width, scale))
        total += network_flops(model.network, h, w)
    return total
