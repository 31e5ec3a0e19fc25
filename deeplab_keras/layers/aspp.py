"""Atrous spatial pyramid pooling (DeepLab v2, section 3.3): parallel dilated branches whose logits are summed."""
import keras
from keras import ops

ASPP_RATES = {"S": (2, 4, 8, 12), "L": (6, 12, 18, 24), "LARGEFOV": (12,)}


def resolve_rates(aspp):
    """Turn ``"L"``, ``"S"``, ``"largefov"`` or a tuple of positive ints into a tuple of rates.

    Raises:
        ValueError: naming ``aspp`` and the allowed values.
    """
    if isinstance(aspp, str):
        key = aspp.upper()
        if key not in ASPP_RATES:
            raise ValueError(f"aspp={aspp!r} is not known; use 'L' {ASPP_RATES['L']}, 'S' {ASPP_RATES['S']}, "
                             f"'largefov' (VGG-16 only) or a tuple of positive dilation rates")
        return ASPP_RATES[key]
    try:
        rates = tuple(int(r) for r in aspp)
    except TypeError:
        raise ValueError(f"aspp={aspp!r} must be 'L', 'S', 'largefov' or a tuple of positive ints") from None
    if not rates or any(r < 1 for r in rates) or any(r != float(a) for r, a in zip(rates, aspp)):
        raise ValueError(f"aspp={aspp!r}: give a non-empty tuple of positive integer dilation rates, e.g. (6, 12, 18, 24)")
    return rates


@keras.saving.register_keras_serializable(package="deeplab_keras")
class ASPP(keras.layers.Layer):
    """ASPP head: one branch per dilation rate, branch logits summed (``Eltwise SUM`` in the released prototxt).

    With ``branch_filters=None`` (ResNet) each branch is one 3x3 dilated conv straight to ``num_classes``.
    With ``branch_filters=1024`` (VGG-16) each branch is fc6 (3x3 dilated) -> ReLU -> dropout -> fc7 (1x1) ->
    ReLU -> dropout -> fc8 (1x1 to classes); DeepLab-LargeFOV is the single-branch case ``rates=(12,)``.

    Args:
        num_classes: output channels (logits).
        rates: dilation rates, one branch each.
        branch_filters: width of fc6/fc7 per branch, or None for the ResNet head.
        dropout: dropout rate after fc6 and fc7 (VGG branches only).

    Example:
        >>> import numpy as np
        >>> ASPP(21, (6, 12, 18, 24))(np.zeros((1, 9, 9, 8), "float32")).shape
        TensorShape([1, 9, 9, 21])
    """

    def __init__(self, num_classes, rates, branch_filters=None, dropout=0.5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.rates = tuple(int(r) for r in rates)
        self.branch_filters = None if branch_filters is None else int(branch_filters)
        self.dropout = float(dropout)
        init = keras.initializers.RandomNormal(stddev=0.01)  # the paper's classifier init
        conv = keras.layers.Conv2D
        self.branches = []
        for r in self.rates:
            if self.branch_filters is None:
                layers = [conv(self.num_classes, 3, padding="same", dilation_rate=r, kernel_initializer=init,
                               dtype=self.dtype_policy, name=f"aspp_r{r}_conv")]
            else:
                layers = [
                    conv(self.branch_filters, 3, padding="same", dilation_rate=r, activation="relu",
                         dtype=self.dtype_policy, name=f"fc6_r{r}"),
                    keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"drop6_r{r}"),
                    conv(self.branch_filters, 1, activation="relu", dtype=self.dtype_policy, name=f"fc7_r{r}"),
                    keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"drop7_r{r}"),
                    conv(self.num_classes, 1, kernel_initializer=init, dtype=self.dtype_policy, name=f"fc8_r{r}"),
                ]
            self.branches.append(layers)

    def build(self, input_shape):
        for layers in self.branches:
            shape = input_shape
            for layer in layers:
                layer.build(shape)
                shape = layer.compute_output_shape(shape)

    def call(self, features, training=None):
        if self.branch_filters is None:
            return self._fused_classifier(features)
        total = None
        for layers in self.branches:
            x = features
            for layer in layers:
                x = layer(x, training=training) if isinstance(layer, keras.layers.Dropout) else layer(x)
            total = x if total is None else total + x
        return total

    def _fused_classifier(self, features):
        """The ResNet head (one 3x3 dilated conv per rate, summed) as ONE matmul plus shifted slices.

        Every tap of every branch is a 1x1 product, so ``taps = features @ [K_r(i, j)]`` for all rates r and taps
        (i, j) at once; a dilated 3x3 conv with "same" padding is then the sum over (i, j) of its tap map shifted by
        ``((i - 1) d, (j - 1) d)``, read from the tap map zero-padded by ``d``. The result equals the sum of the
        branches' Conv2D outputs (same weights, same layers); it avoids the space-to-batch form in which TensorFlow
        runs large-rate dilated convs on small maps (measured: the head 348 -> 72 ms at 65x65x2048 on 2 cores).
        """
        classes = self.num_classes
        convs = [branch[0] for branch in self.branches]
        cin = ops.shape(convs[0].kernel)[2]
        kernels = [ops.reshape(ops.transpose(conv.kernel, (2, 0, 1, 3)), (cin, 9 * classes)) for conv in convs]
        kernel = ops.cast(ops.concatenate(kernels, axis=1), features.dtype)
        taps = ops.matmul(features, kernel)                                       # [N, h, w, rates * 9 * C]
        h, w = ops.shape(features)[1], ops.shape(features)[2]
        total = None
        for r, conv in enumerate(convs):
            d = self.rates[r]
            block = taps[..., r * 9 * classes:(r + 1) * 9 * classes]
            padded = ops.pad(block, [[0, 0], [d, d], [d, d], [0, 0]])
            for i in range(3):
                for j in range(3):
                    t = 3 * i + j
                    part = padded[:, i * d:i * d + h, j * d:j * d + w, t * classes:(t + 1) * classes]
                    total = part if total is None else total + part
        bias = sum(ops.cast(conv.bias, features.dtype) for conv in convs)
        return total + bias

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "rates": self.rates,
                "branch_filters": self.branch_filters, "dropout": self.dropout}
