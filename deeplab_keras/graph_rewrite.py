"""The inference graph's rewrites of the Keras model: what TF inference and the exported graphs compute instead of
the training graph.

Traced (or run eagerly) inside ``with GraphRewrite(model, ...):``, the model's layers compute the same function in
the form the runtimes run natively. :class:`deeplab_keras.inference.Predictor` (``deeplab eval`` / ``deeplab
predict``, :func:`~deeplab_keras.inference.predict_probabilities`) runs it with ``weights="live"``, the exports
(``deeplab_keras.export``) with ``weights="snapshot"``; the export's verification and the tests compare both with
the unmodified Keras model:

- **native dilation**: each atrous ``Conv2D`` is one ``tf.nn.conv2d(..., dilations=r)`` instead of Keras'
  ``tf.nn.convolution``, which with a dynamic H, W traces SpaceToBatchND + Conv2D + BatchToSpaceND (tf2onnx then
  emits SpaceToDepth/DepthToSpace pairs, no dilated ``Conv``). oneDNN runs the dilated ``Conv2D`` directly:
  measured on 2 cores, the ResNet ASPP-L head at 65x65x2048: 0.21 s native vs 0.46 s SpaceToBatch.
- **folded batch norm**: a ``Conv2D`` whose only consumer is an inference-mode ``BatchNormalization`` runs with the
  scaled kernel and bias ``W * s``, ``(b - mean) * s + beta`` (``s = gamma / sqrt(var + eps)``), and the batch norm
  becomes the identity: two elementwise passes less per convolution, and the bias add fuses with the convolution
  (and its ReLU) in TF's and onnxruntime's kernels.
- **fused ASPP head** (``aspp_head="fused"``, ResNet heads): the branches' 3x3 taps as one 1x1 matmul
  ``Cin -> taps x C`` and shifted sums of its slices (zero padding like ``SAME``). The head alone at 65x65x2048 ->
  21 takes as long as the native dilated convolutions (0.21 s, 2 cores), but whole SavedModels run at 0.75x (ResNet-50
  x0.25) and 0.84x (ResNet-101) of the plain head's time at 513x513, so the SavedModel uses it by default;
  onnxruntime gains nothing (0.97x vs 0.96x), so ONNX keeps the plain head, and LiteRT always gets the plain head
  (its int8 converter aborted on the fused one in an earlier attempt).

**Where the folded weights come from** (``weights=``):

- ``"snapshot"`` (the exports): computed once when the rewrite is built (float64 arithmetic) into ``tf.Variable`` s
  that the exported endpoints capture (``ExportArchive`` tracks them): an artifact is a snapshot of the weights.
- ``"live"`` (in-process inference): computed in the graph from the model's variables at every call (float32
  arithmetic, once per entry of the context however often the model runs inside it), so a rewrite, or a traced
  function that entered it, reused after the weights changed (training, ``load_weights``) computes with the new
  weights. Measured on the shared 2-core machine, ResNet-101 at 513x513 (177 MB of weights): the fold alone takes
  20-40 ms per call, about 1-2 % of a float32 call (a snapshot rewrite ran at 0.99x of the live one's time, same
  rounds) and 3-7 % of a bf16 call, where it also reads the float32 weights. With ``source=`` (a model of the same
  architecture, e.g. the float32 original of a bfloat16 copy) every weight is read from ``source``'s variables,
  folded in float32 and rounded once to the layer's compute dtype; variables of ``model`` that no rewritten layer
  reads are assigned from ``source`` (cast) on each entry, so the copy follows the original's current weights too.

The rewrites patch layer instances only while some thread is inside the context, and the patched ``call`` computes
the rewritten form only for the thread inside it (and only in inference: a rewritten batch norm called with
``training=True`` raises), every other caller gets the layer's own ``call``: the model itself is unchanged
afterwards, and a model trained or run plainly in another thread meanwhile is not affected. Models without Keras
functional nodes (subclassed) get no batch norm folding (native dilation still applies).

Example:
    >>> rewrite = GraphRewrite(model, aspp_head="fused")                          # doctest: +SKIP
    >>> with rewrite:                                                               # doctest: +SKIP
    ...     logits = tf.function(model)(images)
    >>> rewrite.stats                                                               # doctest: +SKIP
    {'native_dilated_convs': 27, 'folded_batch_norms': 104, 'aspp_head': 'fused'}
"""
import threading

import tensorflow as tf

from deeplab_keras import _keras_compat

__all__ = ["ASPP_HEADS", "WEIGHTS", "GraphRewrite"]

ASPP_HEADS = ("plain", "fused")
WEIGHTS = ("snapshot", "live")

_local = threading.local()  # .frames: the rewrites this thread is inside, innermost last
_lock = threading.Lock()
_installed = {}  # layer -> [how many entered rewrites (all threads) patch it, the instance's own ``call`` or None]


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


def _plain_conv(conv):
    import keras

    return (type(conv) is keras.layers.Conv2D and conv.data_format == "channels_last" and conv.groups == 1
            and not getattr(conv.dtype_policy, "quantization_mode", None))


def _foldable(conv, bn):
    import keras

    return (_plain_conv(conv) and type(bn) is keras.layers.BatchNormalization and bn.axis in (-1, 3)
            and getattr(conv.activation, "__name__", "") == "linear")


def _read(variable, dtype):
    return tf.cast(tf.convert_to_tensor(variable), dtype)


def _conv_weights(conv, dtype):
    return _read(conv.kernel, dtype), (_read(conv.bias, dtype) if conv.use_bias else None)


def _folded_weights(conv, bn, dtype):
    """``conv`` + ``bn`` (inference) as one kernel and bias, computed in ``dtype``."""
    scale = tf.math.reciprocal(tf.sqrt(_read(bn.moving_variance, dtype) + tf.cast(bn.epsilon, dtype)))
    if bn.scale:
        scale = _read(bn.gamma, dtype) * scale
    bias = (_read(conv.bias, dtype) if conv.use_bias else 0.0) - _read(bn.moving_mean, dtype)
    bias = bias * scale + (_read(bn.beta, dtype) if bn.center else 0.0)
    return _read(conv.kernel, dtype) * scale, bias


def _fused_weights(convs, dtype):
    """The ASPP branches' 3x3 kernels as one ``[Cin, 9 * branches * C]`` matrix and their summed biases."""
    cin = convs[0].kernel.shape[2]
    kernel = tf.concat([tf.reshape(tf.transpose(_read(c.kernel, dtype), (2, 0, 1, 3)), [cin, -1]) for c in convs], -1)
    return kernel, tf.add_n([_read(c.bias, dtype) for c in convs])


def _conv(conv):
    """``conv``'s computation as one TF ``Conv2D`` (dilations native): ``call((kernel, bias), inputs)``.

    A stride-1 ``same`` convolution with an odd kernel gets its padding explicitly (the same zeros): onnxruntime
    refuses a dilated ``Conv`` with ``auto_pad=SAME_UPPER``, which tf2onnx writes for ``padding="SAME"``.
    """
    padding = conv.padding.upper()
    if padding == "SAME" and conv.strides == (1, 1) and all(k % 2 for k in conv.kernel_size):
        padding = [[0, 0]] + [[(k - 1) * d // 2] * 2 for k, d in zip(conv.kernel_size, conv.dilation_rate)] + [[0, 0]]

    def call(weights, inputs):
        kernel, bias = weights
        x = tf.nn.conv2d(inputs, kernel, strides=conv.strides, padding=padding, dilations=conv.dilation_rate)
        if bias is not None:
            x = tf.nn.bias_add(x, bias)
        return conv.activation(x)
    return call


def _identity(weights, inputs, training=None, mask=None):
    if training is True:
        raise RuntimeError("a folded batch norm was called with training=True inside a GraphRewrite: the rewritten "
                           "graph is for inference only (call the model outside the rewrite to train)")
    return inputs


def _fused_aspp(aspp):
    """The ResNet ASPP head (3x3 dilated branches summed) as one matmul and shifted sums (summed in float32)."""
    classes = aspp.num_classes
    pad = max(aspp.rates)
    offsets = [((i - 1) * r, (j - 1) * r) for r in aspp.rates for i in range(3) for j in range(3)]

    def call(weights, features, training=None):
        kernel, bias = weights
        shape = tf.shape(features)
        n, h, w = shape[0], shape[1], shape[2]
        taps = tf.matmul(tf.reshape(features, [-1, features.shape[-1]]), kernel)
        taps = tf.pad(tf.reshape(taps, [n, h, w, len(offsets) * classes]), [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        taps = tf.cast(taps, tf.float32)  # bfloat16 taps: 36 additions would round 36 times
        total = None
        for t, (dy, dx) in enumerate(offsets):
            part = tf.slice(taps, tf.stack([0, pad + dy, pad + dx, t * classes]), tf.stack([n, h, w, classes]))
            total = part if total is None else total + part
        return tf.cast(tf.nn.bias_add(total, tf.cast(bias, tf.float32)), features.dtype)
    return call


def _fusable_aspp(layer):
    from deeplab_keras.layers.aspp import ASPP

    return isinstance(layer, ASPP) and layer.branch_filters is None and all(
        _plain_conv(b[0]) and b[0].kernel_size == (3, 3) and b[0].padding == "same" and b[0].use_bias
        for b in layer.branches)


class _Patch:
    """A layer's rewritten form: ``call(weights, *args, **kwargs)`` and ``weights(dtype)`` -> its weight tensors
    (from the source layers' variables); ``computed``: the weights are derived (folded, fused), not variables."""

    def __init__(self, layer, call, weights, computed):
        self.layer, self.call, self.weights, self.computed = layer, call, weights, computed
        self.snapshot = None


class _Frame:
    """One entry of a rewrite by one thread: the live weights computed in it (once per entry)."""

    def __init__(self, rewrite):
        self.rewrite, self.weights = rewrite, {}

    def call(self, layer, args, kwargs):
        patch = self.rewrite.patches[layer]
        if patch.snapshot is not None:
            weights = patch.snapshot
        else:
            if layer not in self.weights:
                dtype = tf.as_dtype(layer.compute_dtype)
                math = tf.float32 if patch.computed else dtype
                self.weights[layer] = tuple(None if w is None else tf.cast(w, dtype) for w in patch.weights(math))
            weights = self.weights[layer]
        return patch.call(weights, *args, **kwargs)


def _frames():
    if not hasattr(_local, "frames"):
        _local.frames = []
    return _local.frames


def _dispatcher(layer, own):
    """The ``call`` installed on a patched layer: the innermost rewrite of this thread that patches it, else the
    layer's own ``call`` (``own``: an instance attribute that was there before, else the class's)."""
    own = own or type(layer).call.__get__(layer)

    def call(*args, **kwargs):
        for frame in reversed(_frames()):
            if layer in frame.rewrite.patches:
                return frame.call(layer, args, kwargs)
        return own(*args, **kwargs)
    return call


class GraphRewrite:
    """Context manager: ``model``'s layers compute in the inference graph's form while inside (module docstring).

    Args:
        model: a built Keras model (nested functional models are rewritten too).
        native_dilation: atrous ``Conv2D`` as native dilated convolutions.
        fold_batch_norm: fold inference batch norms into the convolutions before them.
        aspp_head: ``"plain"`` or ``"fused"`` (ResNet ASPP heads; others stay plain).
        weights: ``"snapshot"`` (folded weights computed now, as ``tf.Variable`` s: the exports) or ``"live"``
            (computed from the variables in every call: in-process inference).
        source: ``"live"`` only: a model of the same architecture whose variables give the weights (e.g. the
            float32 model of a bfloat16 copy); default ``model``.
    Attributes:
        stats: ``{"native_dilated_convs", "folded_batch_norms", "aspp_head"}`` for the export report.
    Raises:
        ValueError: an unknown ``aspp_head`` / ``weights``, or a ``source`` whose weights do not match ``model``'s.
    """

    def __init__(self, model, native_dilation=True, fold_batch_norm=True, aspp_head="plain", weights="snapshot",
                 source=None):
        import keras

        if aspp_head not in ASPP_HEADS:
            raise ValueError(f"aspp_head must be one of {ASPP_HEADS}, got {aspp_head!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if source is not None and weights != "live":
            raise ValueError("source= needs weights='live'")
        layers = _keras_compat.flatten_layers(model)
        sources = dict(zip(layers, _keras_compat.flatten_layers(source))) if source is not None else {}
        if source is not None:
            _check_same_weights(model, source)
        src = lambda layer: sources.get(layer, layer)  # noqa: E731
        self.patches = {}  # layer -> _Patch
        folded = 0
        if fold_batch_norm:
            for bn in layers:
                conv = _single_consumer_producer(bn) if isinstance(bn, keras.layers.BatchNormalization) else None
                if conv is None or not _foldable(conv, bn) or conv in self.patches:
                    continue
                self.patches[conv] = _Patch(conv, _conv(conv), lambda d, c=src(conv), b=src(bn):
                                            _folded_weights(c, b, d), computed=True)
                self.patches[bn] = _Patch(bn, _identity, lambda d: (), computed=False)
                folded += 1
        heads = [layer for layer in layers if aspp_head == "fused" and _fusable_aspp(layer)]
        for aspp in heads:
            self.patches[aspp] = _Patch(aspp, _fused_aspp(aspp), lambda d, a=src(aspp):
                                        _fused_weights([branch[0] for branch in a.branches], d), computed=True)
        in_heads = {branch[0] for aspp in heads for branch in aspp.branches}
        dilated = 0
        for conv in layers:
            if conv in in_heads or not _plain_conv(conv):
                continue
            native = native_dilation and max(conv.dilation_rate) > 1
            dilated += native
            if (native or source is not None) and conv not in self.patches:  # a copy's convs read the source's
                self.patches[conv] = _Patch(conv, _conv(conv), lambda d, c=src(conv): _conv_weights(c, d),
                                            computed=False)
        if weights == "snapshot":
            for layer, patch in self.patches.items():
                if patch.computed:
                    patch.snapshot = tuple(
                        tf.Variable(tf.cast(w, layer.compute_dtype), trainable=False, name=f"{layer.name}_{kind}")
                        for w, kind in zip(patch.weights(tf.float64), ("folded_kernel", "folded_bias")))
        self._sync = []
        if source is not None:
            read = {id(v) for layer in list(self.patches) + list(in_heads) for v in layer.weights}
            self._sync = [(v, s) for v, s in zip(model.weights, source.weights) if id(v) not in read]
        self.stats = {"native_dilated_convs": dilated, "folded_batch_norms": folded,
                      "aspp_head": "fused" if heads else "plain"}

    def __enter__(self):
        with _lock:
            for layer in self.patches:
                if layer not in _installed:
                    _installed[layer] = [0, layer.__dict__.get("call")]
                    object.__setattr__(layer, "call", _dispatcher(layer, _installed[layer][1]))
                _installed[layer][0] += 1
        _frames().append(_Frame(self))
        for variable, value in self._sync:
            variable.assign(tf.cast(value, variable.dtype))
        return self

    def __exit__(self, *exc):
        frames = _frames()
        del frames[max(i for i, frame in enumerate(frames) if frame.rewrite is self)]
        with _lock:
            for layer in self.patches:
                _installed[layer][0] -= 1
                if not _installed[layer][0]:
                    own = _installed.pop(layer)[1]
                    if own is None:
                        layer.__dict__.pop("call", None)
                    else:
                        object.__setattr__(layer, "call", own)
        return False


def _check_same_weights(model, source):
    mine, theirs = model.weights, source.weights
    if len(mine) != len(theirs) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(mine, theirs)):
        raise ValueError(f"source= must have the same architecture as the model: {len(theirs)} weights vs "
                         f"{len(mine)}, or different shapes")
