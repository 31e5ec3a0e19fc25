"""DeepLab v2 (Chen et al., TPAMI 2017): atrous backbone + ASPP head, optional multi-scale (MSC) max fusion."""
import keras

from deeplab_keras.backbones.common import check_output_stride
from deeplab_keras.backbones.resnet import CAFFE_BN_EPSILON, RESNET_BLOCKS, resnet_features, resnet_output_size
from deeplab_keras.backbones.vgg import vgg16_features, vgg16_output_size
from deeplab_keras.layers.aspp import ASPP, resolve_rates
from deeplab_keras.layers.preprocessing import CaffeInterp, CaffePreprocess, ResizeLike, interp_factors

BACKBONES = ("resnet50", "resnet101", "vgg16")
MIN_INPUT_SIZE = 33


def _check_args(num_classes, backbone, output_stride, aspp, msc_scales, width_multiplier, stage_blocks):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int (21 for PASCAL VOC)")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not known; use one of {BACKBONES}")
    check_output_stride(output_stride)
    rates = resolve_rates(aspp)
    if isinstance(aspp, str) and aspp.upper() == "LARGEFOV" and backbone != "vgg16":
        raise ValueError("aspp='largefov' is the VGG-16 head; with a ResNet backbone use 'L', 'S' or a tuple of rates")
    if msc_scales is not None:
        scales = tuple(float(s) for s in msc_scales)
        if not scales or any(s <= 0 for s in scales) or 1.0 not in scales:
            raise ValueError(f"msc_scales={msc_scales!r} must be None or positive scales that include 1.0, "
                             "e.g. (1.0, 0.75, 0.5)")
        for s in scales:
            interp_factors(s)
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier={width_multiplier!r} must be > 0 (1.0 = the paper's widths)")
    if stage_blocks is not None:
        if backbone == "vgg16":
            raise ValueError("stage_blocks applies to ResNet backbones only; leave it None for vgg16")
        if len(stage_blocks) != 4 or any(int(b) < 1 for b in stage_blocks):
            raise ValueError(f"stage_blocks={stage_blocks!r} must be 4 positive block counts (conv2..conv5), "
                             f"e.g. {RESNET_BLOCKS['resnet50']}")
    return rates


def build_network(num_classes, backbone, output_stride, rates, width_multiplier=1.0, stage_blocks=None,
                  dropout=0.5, bn_epsilon=CAFFE_BN_EPSILON, pool5a=False, name="deeplab_network"):
    """Single-scale DeepLab network: raw RGB 0..255 [N,H,W,3] -> float32 logits [N,h,w,C] (see :func:`logits_size`)."""
    images = keras.Input((None, None, 3), name="image")
    x = CaffePreprocess(name="preprocess")(images)
    if backbone == "vgg16":
        x = vgg16_features(x, output_stride, width_multiplier, pool5a=pool5a)
        branch_filters = max(1, int(round(1024 * width_multiplier)))
    else:
        x = resnet_features(x, backbone, output_stride, width_multiplier, stage_blocks, bn_epsilon=bn_epsilon)
        branch_filters = None
    x = ASPP(num_classes, rates, branch_filters=branch_filters, dropout=dropout, name="aspp")(x)
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
    """DeepLab v2 semantic segmentation model.

    The geometry is the released Caffe models' (DeepLab's mean colour, ceil-mode pooling, Caffe ``Interp`` for MSC),
    so converted Caffe weights (``weights="x.caffemodel"``) give the reference logits.

    Input: float32 [N, H, W, 3] RGB in 0..255 (any H, W >= 33; preprocessing is inside the model).
    Output: float32 logits [N, h, w, num_classes], ``(h, w) = model.logits_size(H, W)`` (513x513 at OS 8 -> 65x65,
    375x500 -> 48x63); upsample them corner-aligned to the image size for a prediction.

    Args:
        num_classes: number of classes (21 for PASCAL VOC).
        backbone: "resnet101", "resnet50" or "vgg16".
        output_stride: 8 (the paper), 16 or 32 (plain ImageNet network).
        aspp: "L" rates (6,12,18,24), "S" rates (2,4,8,12), "largefov" (VGG-16 DeepLab-LargeFOV, one branch at
            rate 12) or a tuple of rates. Branch logits are summed.
        msc_scales: None or scales such as (1.0, 0.75, 0.5): the network runs on each input rescaled by Caffe's
            Interp (0.75: 513 -> 385, 0.5: 513 -> 257; corner-aligned bilinear, shared weights), each scale's
            logits are resized (corner-aligned) to the scale-1 logits size and fused by pixel-wise max.
        weights: None (random init), "imagenet" (keras.applications ImageNet backbone weights) or a path to a
            `.keras` / `.weights.h5` file or a training run directory.
        width_multiplier: scales every width; 1.0 is the paper (small values give tiny test models).
        stage_blocks: ResNet blocks per stage (conv2..conv5), default the real depth.
        dropout: VGG-16 fc6/fc7 dropout rate.
        bn_epsilon: ResNet batch-norm epsilon (Caffe's 1e-5; keras.applications uses 1.001e-5).
        pool5a: VGG-16 only: DeepLab-LargeFOV's AVE 3x3/1 pooling after pool5. None: True for aspp="largefov",
            False for VGG-ASPP (what the released prototxts have).

    For MSC training, ``model.multi_scale_logits(images, training=True)`` returns every scale's logits (resized to
    the scale-1 logits size) and the fused ones; the loss is the sum of their cross-entropies (see
    :mod:`deeplab_keras.train`).

    Example:
        >>> import numpy as np, deeplab_keras as dk
        >>> model = dk.DeepLabV2(num_classes=3, backbone="resnet50", width_multiplier=0.125,
        ...                      stage_blocks=(1, 1, 1, 1), msc_scales=(1.0, 0.5))
        >>> model(np.zeros((2, 65, 97, 3), "float32")).shape
        TensorShape([2, 9, 13, 3])
    """

    def __init__(self, num_classes=21, backbone="resnet101", output_stride=8, aspp="L", msc_scales=None,
                 weights=None, width_multiplier=1.0, stage_blocks=None, dropout=0.5, bn_epsilon=CAFFE_BN_EPSILON,
                 pool5a=None, **kwargs):
        rates = _check_args(num_classes, backbone, output_stride, aspp, msc_scales, width_multiplier, stage_blocks)
        if pool5a is None:
            pool5a = backbone == "vgg16" and len(rates) == 1
        elif pool5a and backbone != "vgg16":
            raise ValueError("pool5a=True is a VGG-16 (DeepLab-LargeFOV) layer; leave it None for ResNet backbones")
        # === Network shared by every scale ===
        network = build_network(num_classes, backbone, output_stride, rates, width_multiplier, stage_blocks, dropout,
                                bn_epsilon=bn_epsilon, pool5a=bool(pool5a))
        # === Multi-scale inputs and max fusion ===
        images = keras.Input((None, None, 3), name="image")
        scales = tuple(float(s) for s in msc_scales) if msc_scales else (1.0,)
        per_scale = {}
        reference = network(images)
        resize_like = ResizeLike(dtype="float32", name="msc_resize")
        for s in scales:
            if s == 1.0:
                per_scale[s] = reference
            else:
                scaled = CaffeInterp(s, name=_msc_input_name(s))(images)
                per_scale[s] = resize_like([network(scaled), reference])
        if len(scales) > 1:
            fused = keras.layers.Maximum(dtype="float32", name="msc_fuse")([per_scale[s] for s in scales])
        else:
            fused = reference
        super().__init__(inputs=images, outputs=fused, name=kwargs.pop("name", "deeplab_v2"), **kwargs)
        # === Config ===
        self.network = network
        self.num_classes = num_classes
        self.backbone = backbone
        self.output_stride = output_stride
        self.aspp = aspp if isinstance(aspp, str) else tuple(rates)
        self.rates = rates
        self.msc_scales = tuple(float(s) for s in msc_scales) if msc_scales else None
        self.width_multiplier = float(width_multiplier)
        self.stage_blocks = tuple(int(b) for b in stage_blocks) if stage_blocks is not None else None
        self.dropout = float(dropout)
        self.bn_epsilon = float(bn_epsilon)
        self.pool5a = bool(pool5a)
        self._scales = scales
        if weights is not None:
            from deeplab_keras.models.weights import load_weights_into
            load_weights_into(self, weights)

    def __call__(self, inputs, *args, **kwargs):
        _check_input_shape(inputs)
        return super().__call__(inputs, *args, **kwargs)

    def logits_size(self, height, width):
        """Logits grid ``(h, w)`` this model gives for an ``height x width`` input (see :func:`logits_size`)."""
        return logits_size(height, width, self.backbone, self.output_stride)

    @property
    def classifier_variables(self):
        """Trainable variables of the ASPP / fc6-fc8 head (the paper trains them at 10x the backbone LR)."""
        return self.network.get_layer("aspp").trainable_variables

    def multi_scale_logits(self, images, training=False):
        """Logits at every MSC scale plus the fused ones, all at the scale-1 logits size.

        Args:
            images: float32 [N, H, W, 3] RGB 0..255.
            training: forwarded to the layers (dropout, batch norm).

        Returns:
            dict ``{"scale_1.0": ..., "scale_0.75": ..., "fused": ...}`` of float32 [N, h, w, C] tensors.
        """
        reference = self.network(images, training=training)
        out = {}
        for s in self._scales:
            if s == 1.0:
                out[f"scale_{s}"] = reference
            else:
                scaled = self.get_layer(_msc_input_name(s))(images)
                out[f"scale_{s}"] = self.get_layer("msc_resize")([self.network(scaled, training=training),
                                                                  reference])
        out["fused"] = keras.ops.max(keras.ops.stack(list(out.values()), axis=0), axis=0) if len(out) > 1 \
            else reference
        return out

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "num_classes": self.num_classes,
                "backbone": self.backbone, "output_stride": self.output_stride,
                "aspp": list(self.aspp) if isinstance(self.aspp, tuple) else self.aspp,
                "msc_scales": list(self.msc_scales) if self.msc_scales else None,
                "width_multiplier": self.width_multiplier,
                "stage_blocks": list(self.stage_blocks) if self.stage_blocks else None, "dropout": self.dropout,
                "bn_epsilon": self.bn_epsilon, "pool5a": self.pool5a}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def from_preset(cls, name, cache_dir=None, *, sha256=None):
        """A released DeepLab v2 model by name (downloaded, checked, converted and cached on first use); see
        :mod:`deeplab_keras.models.presets` for the names and the cache.

        Example:
            >>> model = DeepLabV2.from_preset("deeplabv2_resnet101_msc_voc")   # doctest: +SKIP
        """
        from deeplab_keras.models.presets import from_preset
        return from_preset(name, cache_dir, sha256=sha256)


def _check_input_shape(inputs):
    """Reject a wrongly shaped input by its shape alone (Keras' own error would print the whole array)."""
    shape = getattr(inputs, "shape", None)
    if shape is None:
        return
    shape = tuple(None if d is None else int(d) for d in shape)
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (add a batch axis: images[None])" if len(shape) == 3 and shape[-1] == 3 else ""
        raise ValueError(f"DeepLabV2 takes RGB images of shape [N, H, W, 3]; got shape {shape}{hint}")


def _msc_input_name(scale):
    return f"msc_input_{scale:g}".replace(".", "_")
