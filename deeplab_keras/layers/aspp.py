"""Atrous spatial pyramid pooling (DeepLab v2, section 3.3): parallel dilated branches whose logits are summed."""
import keras


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
        total = None
        for layers in self.branches:
            x = features
            for layer in layers:
                x = layer(x, training=training) if isinstance(layer, keras.layers.Dropout) else layer(x)
            total = x if total is None else total + x
        return total

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "rates": self.rates,
                "branch_filters": self.branch_filters, "dropout": self.dropout}
