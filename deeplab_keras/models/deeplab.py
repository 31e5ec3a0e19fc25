"""DeepLab v2 (Chen et al., TPAMI 2017): atrous backbone + ASPP head (:func:`build_network`), optionally wrapped in
multi-scale max fusion (:class:`~deeplab_keras.models.msc.MSC`), as one Keras model (:class:`DeepLabV2`)."""
import re

import keras

from deeplab_keras.backbones.resnet import resnet_features, resnet_output_size
from deeplab_keras.backbones.vgg import vgg16_features, vgg16_output_size
from deeplab_keras.layers.aspp import ASPP
from deeplab_keras.layers.preprocessing import CaffePreprocess
from deeplab_keras.models.config import ModelConfig
from deeplab_keras.models.msc import MSC
from deeplab_keras.weights import convert, download
from deeplab_keras.weights.checkpoints import load_weights_into

# The classifier layers (lr_mult 10 in the released solvers), by ``variable.path``: each ResNet ASPP branch's
# conv (``aspp/aspp_r6_conv/kernel``) and each VGG-16 branch's fc8 (``aspp/fc8_r12/bias``); fc6 / fc7 are not.
CLASSIFIER_PATTERN = r"(^|/)(aspp_r\d+_conv|fc8[^/]*)/"


def build_network(config, name="deeplab_network"):
    """The single-scale DeepLab network a :class:`ModelConfig` describes: raw RGB 0..255 [N,H,W,3] -> float32
    logits [N,h,w,C] (see :func:`logits_size`).

    Example:
        >>> build_network(ModelConfig(3, "vgg16", aspp="largefov", width_multiplier=0.0625)).output.shape
        (None, None, None, 3)
    """
    images = keras.Input((None, None, 3), name="image")
    x = CaffePreprocess(name="preprocess")(images)
    if config.backbone == "vgg16":
        x = vgg16_features(x, config.output_stride, config.width_multiplier, pool5a=config.use_pool5a)
        branch_filters = max(1, int(round(1024 * config.width_multiplier)))
    else:
        x = resnet_features(x, config.backbone, config.output_stride, config.width_multiplier, config.stage_blocks,
                            bn_epsilon=config.bn_epsilon)
        branch_filters = None
    x = ASPP(config.num_classes, config.rates, branch_filters=branch_filters, dropout=config.dropout, name="aspp")(x)
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(images, logits, name=name)


def logits_size(height, width, backbone="resnet101", output_stride=8):
    """Logits grid ``(h, w)`` of an ``H x W`` input, with Caffe's arithmetic (ceil-mode pooling).

    ResNet: ``h1 = (H - 1) // 2 + 1`` (conv1), ``h2 = ceil((h1 - 1) / 2) + 1`` (pool1), then ``(h - 1) // 2 + 1``
    per strided stage; VGG-16: ``ceil((h - 1) / 2) + 1`` per strided pool. At output stride 8: 321 -> 41,
    513 -> 65, 375 -> 48 (ResNet; ``ceil(375 / 8)`` would be 47), 366x500 -> 47x64 (VGG-16).

    Example:
        >>> logits_size(375, 500)
        (48, 63)
    """
    size = vgg16_output_size if backbone == "vgg16" else resnet_output_size
    return size(int(height), output_stride), size(int(width), output_stride)


@keras.saving.register_keras_serializable(package="deeplab_keras")
class DeepLabV2(keras.Model):
    """DeepLab v2 semantic segmentation model: :func:`build_network` wrapped in :class:`MSC`.

    The geometry is the released Caffe models' (DeepLab's mean colour, ceil-mode pooling, Caffe ``Interp`` for MSC),
    so converted Caffe weights (``weights="x.caffemodel"``) give the reference logits.

    Input: float32 [N, H, W, 3] RGB in 0..255 (any H, W >= 33; preprocessing is inside the model).
    Output: float32 logits [N, h, w, num_classes], ``(h, w) = model.logits_size(H, W)`` (513x513 at OS 8 -> 65x65,
    375x500 -> 48x63); upsample them corner-aligned to the image size for a prediction. With a CRF on top
    (``crf={"trainable": True, "iterations": 5}``, :class:`~deeplab_keras.models.config.CRFConfig`): the CRF's
    log-probabilities [N, H, W, num_classes] at the image size (``model.crf_head``; trainable end to end).

    Args:
        num_classes, backbone, output_stride, aspp, msc_scales, width_multiplier, stage_blocks, dropout,
            bn_epsilon, pool5a, crf: the :class:`~deeplab_keras.models.config.ModelConfig` fields (see there).
        config: a ModelConfig instead of those keyword arguments (giving both is an error).
        weights: None (random init), "imagenet" (keras.applications ImageNet backbone weights), a released
            DeepLab v2 ``.caffemodel`` / deeplab-pytorch ``.pth``, or a ``.keras`` / ``.weights.h5`` file or a
            training run directory (see :func:`deeplab_keras.weights.checkpoints.load_weights_into`).

    ``model.config`` is the ModelConfig; ``model.network`` the single-scale network shared by every scale. For MSC
    training, ``model.multi_scale_logits(images, training=True)`` returns every scale's logits (resized to the
    scale-1 logits size) and the fused ones; the loss is the sum of their cross-entropies.

    Example:
        >>> import numpy as np, deeplab_keras as dk
        >>> model = dk.DeepLabV2(num_classes=3, backbone="resnet50", width_multiplier=0.125,
        ...                      stage_blocks=(1, 1, 1, 1), msc_scales=(1.0, 0.5))
        >>> model(np.zeros((2, 65, 97, 3), "float32")).shape
        TensorShape([2, 9, 13, 3])
    """

    def __init__(self, num_classes=None, backbone=None, output_stride=None, aspp=None, msc_scales=None,
                 weights=None, width_multiplier=None, stage_blocks=None, dropout=None, bn_epsilon=None,
                 pool5a=None, crf=None, *, config=None, **kwargs):
        given = {k: v for k, v in dict(num_classes=num_classes, backbone=backbone, output_stride=output_stride,
                                       aspp=aspp, msc_scales=msc_scales, width_multiplier=width_multiplier,
                                       stage_blocks=stage_blocks, dropout=dropout, bn_epsilon=bn_epsilon,
                                       pool5a=pool5a, crf=crf).items() if v is not None}
        if config is None:
            config = ModelConfig(**given)
        elif given:
            raise ValueError(f"pass either config=ModelConfig(...) or the keyword arguments, not both "
                             f"(got config and {sorted(given)})")
        elif not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        network = build_network(config)
        msc = MSC(network, config.scales)
        images = keras.Input((None, None, 3), name="image")
        outputs = msc(images)["fused"]
        crf_head = None
        if config.crf is not None:  # the CRF on top: log-probabilities at the image size
            from deeplab_keras.crf.layer import CRFHead

            if config.crf.freeze_network:
                network.trainable = False
            crf_head = CRFHead(config.crf.params(), trainable=config.crf.trainable,
                               learn_compatibility=config.crf.compatibility, name="crf")
            outputs = crf_head([outputs, images])
        super().__init__(inputs=images, outputs=outputs, name=kwargs.pop("name", "deeplab_v2"), **kwargs)
        self.config = config
        self.network = network
        self._msc = msc
        self.crf_head = crf_head
        if weights is not None:
            load_weights_into(self, weights)

    # The config's fields, read-only, as attributes (model.backbone, model.msc_scales, ...).
    num_classes = property(lambda self: self.config.num_classes)
    backbone = property(lambda self: self.config.backbone)
    output_stride = property(lambda self: self.config.output_stride)
    aspp = property(lambda self: self.config.aspp)
    rates = property(lambda self: self.config.rates)
    msc_scales = property(lambda self: self.config.msc_scales)
    width_multiplier = property(lambda self: self.config.width_multiplier)
    stage_blocks = property(lambda self: self.config.stage_blocks)
    dropout = property(lambda self: self.config.dropout)
    bn_epsilon = property(lambda self: self.config.bn_epsilon)
    pool5a = property(lambda self: self.config.use_pool5a)

    def __call__(self, inputs, *args, **kwargs):
        _check_input_shape(inputs)
        return super().__call__(inputs, *args, **kwargs)

    def logits_size(self, height, width):
        """Logits grid ``(h, w)`` this model gives for an ``height x width`` input (see :func:`logits_size`)."""
        return logits_size(height, width, self.backbone, self.output_stride)

    @property
    def classifier_variables(self):
        """Trainable variables of the classifier layers (:data:`CLASSIFIER_PATTERN`: ResNet ASPP convs, VGG fc8),
        which the paper trains at 10x the backbone learning rate."""
        return [v for v in self.trainable_variables if re.search(CLASSIFIER_PATTERN, v.path)]

    def multi_scale_logits(self, images, training=False):
        """Logits at every MSC scale plus the fused ones, all at the scale-1 logits size (see :class:`MSC`).

        Args:
            images: float32 [N, H, W, 3] RGB 0..255.
            training: forwarded to the layers (dropout, batch norm).

        Returns:
            dict ``{"scale_1.0": ..., "scale_0.75": ..., "fused": ...}`` of float32 [N, h, w, C] tensors; with a
            CRF on top (``config.crf``), "fused" is the CRF's output (log-probabilities at the image size).
        """
        outputs = self._msc(images, training=training)
        if self.crf_head is not None:
            outputs = dict(outputs)
            outputs["fused"] = self.crf_head([outputs["fused"], images], training=training)
        return outputs

    def without_crf(self):
        """This model without its CRF on top (``config.crf`` removed; the network's weights shared by value):
        logits at output stride, for exports that add the CRF back from stock ops (see ``crf_head.portable``)."""
        plain = DeepLabV2(config=self.config.replace(crf=None), name=self.name)
        plain.network.set_weights(self.network.get_weights())
        return plain

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        kwargs = {key: config.pop(key) for key in ("name", "trainable") if key in config}
        return cls(config=ModelConfig.from_dict(config), **kwargs)

    @classmethod
    def from_weights(cls, path, *, backbone=None, num_classes=None, msc_scales=None, backbone_only=False,
                     **config):
        """The model a released DeepLab v2 ``.caffemodel`` (or deeplab-pytorch ``.pth``) implies, loaded; the given
        arguments are checked against the file (see :func:`deeplab_keras.weights.convert.convert`).

        Example:
            >>> model = DeepLabV2.from_weights("train2_iter_20000.caffemodel",
            ...                                msc_scales=(1.0, 0.75, 0.5))        # doctest: +SKIP
        """
        model, _ = convert.convert(path, backbone=backbone, num_classes=num_classes, msc_scales=msc_scales,
                                 backbone_only=backbone_only, model_class=cls, **config)
        return model

    @classmethod
    def from_preset(cls, name, cache_dir=None, *, sha256=None, timeout=None, progress=True):
        """A released DeepLab v2 model by name (downloaded, checked, converted and cached on first use); see
        :mod:`deeplab_keras.weights.presets` for the names, :mod:`deeplab_keras.weights.download` for the cache.

        Args:
            name: a preset name (a key of ``deeplab_keras.weights.presets.PRESETS``).
            cache_dir: cache root (default: the Keras cache, ``$KERAS_HOME`` or ``~/.keras``).
            sha256: the sha256 you trust for the downloaded file; overrides the registry's and the pinned one.
            timeout: seconds to wait for the connection and for each read of the download (default
                ``$DEEPLAB_DOWNLOAD_TIMEOUT`` or ``deeplab_keras.weights.download.DOWNLOAD_TIMEOUT_S``).
            progress: show the download bar and the "downloading" / "converting" lines on stderr.

        Example:
            >>> model = DeepLabV2.from_preset("deeplabv2_resnet101_msc_voc")   # doctest: +SKIP
        """
        return download.from_preset(name, cache_dir, sha256=sha256, timeout=timeout, progress=progress)


def _check_input_shape(inputs):
    """Reject a wrongly shaped input by its shape alone (Keras' own error would print the whole array)."""
    shape = getattr(inputs, "shape", None)
    if shape is None:
        return
    shape = tuple(None if d is None else int(d) for d in shape)
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (add a batch axis: images[None])" if len(shape) == 3 and shape[-1] == 3 else ""
        raise ValueError(f"DeepLabV2 takes RGB images of shape [N, H, W, 3]; got shape {shape}{hint}")
