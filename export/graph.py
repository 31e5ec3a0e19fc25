"""The serving graph's rewrites of the Keras model: what the exported graphs compute instead of the training graph.

Traced inside ``rewritten(model, ...)``, the model's layers compute the same function in the form the runtimes
run natively (the export's verification compares every artifact with the unmodified Keras model):

- **native dilation**: each atrous ``Conv2D`` is one ``tf.nn.conv2d(..., dilations=r)`` instead of Keras'
  ``tf.nn.convolution``, which with a dynamic H, W traces SpaceToBatchND + Conv2D + BatchToSpaceND (tf2onnx then
  emits SpaceToDepth/DepthToSpace pairs, no dilated ``Conv``). oneDNN runs the dilated ``Conv2D`` directly:
  measured on 2 cores, the ResNet ASPP-L head at 65x65x2048: 0.21 s native vs 0.46 s SpaceToBatch.
- **folded batch norm**: a ``Conv2D`` whose only consumer is an inference-mode ``BatchNormalization`` runs with the
  scaled kernel and bias ``W * s``, ``(b - mean) * s + beta`` (``s = gamma / sqrt(var + eps)``, computed in
  float64 when the rewrite is built), and the batch norm becomes the identity: two elementwise passes less per
  convolution, and the bias add fuses with the convolution (and its ReLU) in TF's and onnxruntime's kernels.
- **fused ASPP head** (``aspp_head="fused"``, ResNet heads): the branches' 3x3 taps as one 1x1 matmul
  ``Cin -> taps x C`` and shifted sums of its slices (zero padding like ``SAME``). The head alone at 65x65x2048 ->
  21 takes as long as the native dilated convolutions (0.21 s, 2 cores), but whole SavedModels run at 0.75x (ResNet-50
  x0.25) and 0.84x (ResNet-101) of the plain head's time at 513x513, so the SavedModel uses it by default;
  onnxruntime gains nothing (0.97x vs 0.96x), so ONNX keeps the plain head, and LiteRT always gets the plain head
  (its int8 converter aborted on the fused one in an earlier attempt).

The rewrites patch layer instances only while the serving function is traced (``serving_archive``'s endpoints
enter the context in their body), so the model itself is unchanged afterwards; the folded weights are
``tf.Variable`` s created once per rewrite, which the endpoints capture (``ExportArchive`` tracks them).

Example:
    >>> rewrite = GraphRewrite(model, aspp_head="fused")                          # doctest: +SKIP
    >>> with rewrite:                                                               # doctest: +SKIP
    ...     logits = tf.function(model)(images)
    >>> rewrite.stats                                                               # doctest: +SKIP
    {'native_dilated_convs': 27, 'folded_batch_norms': 104, 'aspp_head': 'fused'}
"""
import numpy as np
import tensorflow as tf

from deeplab_keras import _keras_compat

ASPP_HEADS = ("plain", "fused")


def _single_consumer_producer(layer):
    """The layer whose output is ``layer``'s only input and is consumed by ``layer`` alone, else None.

    Reads Keras' functional graph (``Layer._inbound_nodes`` / ``_outbound_nodes``, Keras 3); any other structure
    (a layer used twice, a subclassed model without nodes) gives None, i.e. no folding.
    """
    inbound = getattr(layer, "_inbound_nodes", None)
    if not inbound or len(inbound) != 1:
        return None
    parents = inbound[0].parent_nodes
    if len(parents) != 1:
        return None
    producer = parents[0].operation
    if len(getattr(producer, "_inbound_nodes", ())) != 1 or len(getattr(producer, "_outbound_nodes", ())) != 1:
        return None
    return producer


def _foldable(conv, bn):
    import keras

    return (type(conv) is keras.layers.Conv2D and type(bn) is keras.layers.BatchNormalization
            and conv.data_format == "channels_last" and conv.groups == 1 and bn.axis in (-1, 3)
            and getattr(conv.activation, "__name__", "") == "linear")


def _conv(conv, kernel, bias):
    """``conv``'s computation as one TF ``Conv2D`` (dilations native) with ``kernel`` and ``bias``.

    A stride-1 ``same`` convolution with an odd kernel gets its padding explicitly (the same zeros): onnxruntime
    refuses a dilated ``Conv`` with ``auto_pad=SAME_UPPER``, which tf2onnx writes for ``padding="SAME"``.
    """
    padding = conv.padding.upper()
    if padding == "SAME" and conv.strides == (1, 1) and all(k % 2 for k in conv.kernel_size):
        padding = [[0, 0]] + [[(k - 1) * d // 2] * 2 for k, d in zip(conv.kernel_size, conv.dilation_rate)] + [[0, 0]]

    def call(inputs):
        x = tf.nn.conv2d(inputs, kernel, strides=conv.strides, padding=padding, dilations=conv.dilation_rate)
        if bias is not None:
            x = tf.nn.bias_add(x, bias)
        return conv.activation(x)
    return call


def _identity(inputs, training=None, mask=None):
    return inputs


def _fused_aspp(aspp, kernel, bias):
    """The ResNet ASPP head (3x3 dilated branches summed) as one matmul and shifted sums."""
    classes = aspp.num_classes
    pad = max(aspp.rates)
    offsets = [((i - 1) * r, (j - 1) * r) for r in aspp.rates for i in range(3) for j in range(3)]

    def call(features, training=None):
        shape = tf.shape(features)
        n, h, w = shape[0], shape[1], shape[2]
        taps = tf.matmul(tf.reshape(features, [-1, features.shape[-1]]), kernel)
        taps = tf.pad(tf.reshape(taps, [n, h, w, len(offsets) * classes]), [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        total = None
        for t, (dy, dx) in enumerate(offsets):
            part = tf.slice(taps, tf.stack([0, pad + dy, pad + dx, t * classes]), tf.stack([n, h, w, classes]))
            total = part if total is None else total + part
        return tf.nn.bias_add(total, bias)
    return call


def _fusable_aspp(layer):
    from deeplab_keras.layers.aspp import ASPP

    return isinstance(layer, ASPP) and layer.branch_filters is None and all(
        b[0].kernel_size == (3, 3) and b[0].padding == "same" and b[0].use_bias for b in layer.branches)


class GraphRewrite:
    """Context manager: ``model``'s layers compute in the serving graph's form while inside (module docstring).

    Args:
        model: a built float32 Keras model (nested functional models are rewritten too).
        native_dilation: atrous ``Conv2D`` as native dilated convolutions.
        fold_batch_norm: fold inference batch norms into the convolutions before them.
        aspp_head: ``"plain"`` or ``"fused"`` (ResNet ASPP heads; others stay plain).
    Attributes:
        stats: ``{"native_dilated_convs", "folded_batch_norms", "aspp_head"}`` for the export report.
    """

    def __init__(self, model, native_dilation=True, fold_batch_norm=True, aspp_head="plain"):
        import keras

        if aspp_head not in ASPP_HEADS:
            raise ValueError(f"aspp_head must be one of {ASPP_HEADS}, got {aspp_head!r}")
        self.patches = {}  # layer -> replacement of its ``call``
        layers = _keras_compat.flatten_layers(model)
        folded = 0
        if fold_batch_norm:
            for bn in layers:
                conv = _single_consumer_producer(bn) if isinstance(bn, keras.layers.BatchNormalization) else None
                if conv is None or not _foldable(conv, bn) or conv in self.patches:
                    continue
                self.patches[conv] = _conv(conv, *self._folded(conv, bn))
                self.patches[bn] = _identity
                folded += 1
        heads = [layer for layer in layers if aspp_head == "fused" and _fusable_aspp(layer)]
        for aspp in heads:
            self.patches[aspp] = _fused_aspp(aspp, *self._fused_weights(aspp))
        in_heads = {branch[0] for aspp in heads for branch in aspp.branches}
        dilated = 0
        for conv in layers:
            if native_dilation and type(conv) is keras.layers.Conv2D and max(conv.dilation_rate) > 1 and \
                    conv not in in_heads:
                dilated += 1
                if conv not in self.patches:
                    self.patches[conv] = _conv(conv, conv.kernel, conv.bias if conv.use_bias else None)
        self.stats = {"native_dilated_convs": dilated, "folded_batch_norms": folded,
                      "aspp_head": "fused" if heads else "plain"}

    @staticmethod
    def _folded(conv, bn):
        kernel = conv.kernel.numpy().astype(np.float64)
        bias = conv.bias.numpy().astype(np.float64) if conv.use_bias else 0.0
        mean, var = bn.moving_mean.numpy().astype(np.float64), bn.moving_variance.numpy().astype(np.float64)
        gamma = bn.gamma.numpy().astype(np.float64) if bn.scale else 1.0
        beta = bn.beta.numpy().astype(np.float64) if bn.center else 0.0
        scale = gamma / np.sqrt(var + bn.epsilon)
        return (tf.Variable((kernel * scale).astype(np.float32), trainable=False, name=f"{conv.name}_folded_kernel"),
                tf.Variable(((bias - mean) * scale + beta).astype(np.float32), trainable=False,
                            name=f"{conv.name}_folded_bias"))

    @staticmethod
    def _fused_weights(aspp):
        convs = [branch[0] for branch in aspp.branches]
        cin = convs[0].kernel.shape[2]
        kernel = np.concatenate([np.transpose(c.kernel.numpy(), (2, 0, 1, 3)).reshape(cin, -1) for c in convs], -1)
        bias = np.sum([c.bias.numpy().astype(np.float64) for c in convs], axis=0)
        return (tf.Variable(kernel, trainable=False, name=f"{aspp.name}_fused_kernel"),
                tf.Variable(bias.astype(np.float32), trainable=False, name=f"{aspp.name}_fused_bias"))

    def __enter__(self):
        for layer, call in self.patches.items():
            object.__setattr__(layer, "call", call)
        return self

    def __exit__(self, *exc):
        for layer in self.patches:
            layer.__dict__.pop("call", None)
        return False
