"""The one description of a DeepLab v2 model (:class:`ModelConfig`), checked against the constants of
:mod:`deeplab_keras.architecture`. Standard library only: it imports no Keras and no TensorFlow, so configs can be
read, checked and written on any backend (or none)."""
import dataclasses
from typing import Optional, Tuple, Union

from deeplab_keras.architecture import (BACKBONES, CAFFE_BN_EPSILON, RESNET_BLOCKS, check_output_stride,
                                        interp_factors, resolve_rates)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class CRFConfig:
    """The ``crf`` section of a :class:`ModelConfig`: a dense CRF on top of the network (``model.crf: {trainable:
    true, iterations: 5}``). The model's output becomes the CRF's log-probabilities at the image size (the logits
    upsampled, ``Q0 = softmax(logits)``, mean field, ``log Q``), so the training loss is on the CRF output.

    Args:
        trainable: learn the kernel weights and (``compatibility``) a label compatibility (CRF-as-RNN).
        compatibility: with ``trainable``, also learn a symmetric C x C compatibility (initially Potts).
        freeze_network: train only the CRF (the network's weights frozen); False trains both jointly.
        iterations, bilateral_weight, bilateral_xy_std, bilateral_rgb_std, gaussian_weight, gaussian_xy_std: the
            CRF parameters (``deeplab_keras.crf.CRFParams``; None: its default; ``iterations`` defaults to 5 here);
            the weights are the initial values when trainable.

    Example:
        >>> CRFConfig(iterations=3).params().iterations
        3
    """

    trainable: bool = True
    compatibility: bool = True
    freeze_network: bool = False
    iterations: int = 5
    bilateral_weight: Optional[float] = None
    bilateral_xy_std: Optional[float] = None
    bilateral_rgb_std: Optional[float] = None
    gaussian_weight: Optional[float] = None
    gaussian_xy_std: Optional[float] = None

    def __post_init__(self):
        for name in ("trainable", "compatibility", "freeze_network"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"crf.{name}={getattr(self, name)!r} must be true or false")
        self.params()  # checks the values (CRFParams' message)

    def params(self):
        """The :class:`deeplab_keras.crf.CRFParams` (imported here: the CRF package imports Keras)."""
        from deeplab_keras.crf.params import CRFParams

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name in CRFParams.keys() and getattr(self, f.name) is not None}
        try:
            return CRFParams(**values)
        except ValueError as err:
            raise ValueError(f"crf: {err}") from None

    @classmethod
    def from_dict(cls, values):
        """A section from a mapping (unknown keys: ValueError listing the valid ones)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in values if k not in names)
        if unknown:
            raise ValueError(f"unknown model.crf key(s) {unknown}; valid keys: {names}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a DeepLab v2 network (not its weights): what ``DeepLabV2.get_config()`` saves,
    what training configs and presets build from. Checked when created (ValueError naming the field).

    Args:
        num_classes: number of classes (21 for PASCAL VOC).
        backbone: "resnet101", "resnet50" or "vgg16".
        output_stride: 8 (the paper), 16 or 32 (plain ImageNet network).
        aspp: "L" rates (6,12,18,24), "S" rates (2,4,8,12), "largefov" (VGG-16 DeepLab-LargeFOV, one branch at
            rate 12) or a tuple of rates.
        msc_scales: None or scales that include 1.0, e.g. (1.0, 0.75, 0.5): multi-scale inputs, max-fused logits.
        width_multiplier: scales every width; 1.0 is the paper (small values give tiny test models).
        stage_blocks: ResNet blocks per stage (conv2..conv5); None: the real depth.
        dropout: VGG-16 fc6/fc7 dropout rate.
        bn_epsilon: ResNet batch-norm epsilon (Caffe's 1e-5).
        pool5a: VGG-16 only: DeepLab-LargeFOV's AVE 3x3/1 pooling after pool5; None: True for aspp="largefov"
            (see :attr:`use_pool5a`).
        crf: None, or a :class:`CRFConfig` (or a dict of its fields): a dense CRF on top, trainable end to end.

    Example:
        >>> config = ModelConfig(num_classes=3, backbone="resnet50", msc_scales=[1.0, 0.5])
        >>> config.to_dict()["msc_scales"], config.rates
        ([1.0, 0.5], (6, 12, 18, 24))
        >>> ModelConfig.from_dict(config.to_dict()) == config
        True
    """

    num_classes: int = 21
    backbone: str = "resnet101"
    output_stride: int = 8
    aspp: Union[str, Tuple[int, ...]] = "L"
    msc_scales: Optional[Tuple[float, ...]] = None
    width_multiplier: float = 1.0
    stage_blocks: Optional[Tuple[int, ...]] = None
    dropout: float = 0.5
    bn_epsilon: float = CAFFE_BN_EPSILON
    pool5a: Optional[bool] = None
    crf: Optional[CRFConfig] = None

    def __post_init__(self):
        if isinstance(self.crf, str):  # a command-line override: model.crf="{trainable: true, iterations: 5}"
            import yaml  # (a dependency of the package; only this form needs it)

            try:
                parsed = yaml.safe_load(self.crf)
            except yaml.YAMLError:
                parsed = self.crf
            object.__setattr__(self, "crf", {} if parsed is True else None if parsed in (False, None) else parsed)
        if isinstance(self.crf, dict):
            object.__setattr__(self, "crf", CRFConfig.from_dict(self.crf))
        elif self.crf is not None and not isinstance(self.crf, CRFConfig):
            raise ValueError(f"crf={self.crf!r} must be None or a mapping of CRFConfig fields, e.g. "
                             "{trainable: true, iterations: 5}")
        self.validate()
        # canonical forms: tuples (hashable, frozen), floats
        if not isinstance(self.aspp, str):
            object.__setattr__(self, "aspp", resolve_rates(self.aspp))
        if self.msc_scales is not None:
            object.__setattr__(self, "msc_scales", tuple(float(s) for s in self.msc_scales))
        if self.stage_blocks is not None:
            object.__setattr__(self, "stage_blocks", tuple(int(b) for b in self.stage_blocks))
        for name in ("width_multiplier", "dropout", "bn_epsilon"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def validate(self):
        """Raise ValueError naming the first bad field and what to use instead."""
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} must be a positive int (21 for PASCAL VOC)")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is not known; use one of {BACKBONES}")
        check_output_stride(self.output_stride)
        rates = resolve_rates(self.aspp)
        if isinstance(self.aspp, str) and self.aspp.upper() == "LARGEFOV" and self.backbone != "vgg16":
            raise ValueError("aspp='largefov' is the VGG-16 head; with a ResNet backbone use 'L', 'S' or a tuple "
                             "of rates")
        if self.msc_scales is not None:
            scales = self.msc_scales
            if isinstance(scales, (str, bytes)) or not hasattr(scales, "__iter__") \
                    or not all(_is_number(s) for s in scales) or not scales or any(s <= 0 for s in scales) \
                    or 1.0 not in scales:
                raise ValueError(f"msc_scales={scales!r} must be None or positive scales that include 1.0, "
                                 "e.g. (1.0, 0.75, 0.5)")
            for s in scales:
                interp_factors(s)
        if not _is_number(self.width_multiplier) or not self.width_multiplier > 0:
            raise ValueError(f"width_multiplier={self.width_multiplier!r} must be > 0 (1.0 = the paper's widths)")
        if self.stage_blocks is not None:
            if self.backbone == "vgg16":
                raise ValueError("stage_blocks applies to ResNet backbones only; leave it None for vgg16")
            blocks = self.stage_blocks
            if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__len__") or len(blocks) != 4 \
                    or not all(_is_int(b) and b >= 1 for b in blocks):
                raise ValueError(f"stage_blocks={blocks!r} must be 4 positive block counts (conv2..conv5), "
                                 f"e.g. {RESNET_BLOCKS['resnet50']}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not _is_number(self.bn_epsilon) or not self.bn_epsilon > 0:
            raise ValueError(f"bn_epsilon={self.bn_epsilon!r} must be > 0 (Caffe's {CAFFE_BN_EPSILON})")
        if self.pool5a is not None and not isinstance(self.pool5a, bool):
            raise ValueError(f"pool5a={self.pool5a!r} must be None, True or False")
        if self.pool5a and self.backbone != "vgg16":
            raise ValueError("pool5a=True is a VGG-16 (DeepLab-LargeFOV) layer; leave it None for ResNet backbones")
        return rates

    @property
    def rates(self):
        """The ASPP dilation rates, one branch each."""
        return resolve_rates(self.aspp)

    @property
    def scales(self):
        """The MSC scales, ``(1.0,)`` for a single-scale model."""
        return self.msc_scales or (1.0,)

    @property
    def use_pool5a(self):
        """``pool5a`` resolved: None means True for the single-branch VGG-16 head (LargeFOV)."""
        if self.pool5a is None:
            return self.backbone == "vgg16" and len(self.rates) == 1
        return self.pool5a

    def to_dict(self):
        """The fields as plain JSON / YAML types (lists, not tuples)."""
        out = dataclasses.asdict(self)
        for name in ("aspp", "msc_scales", "stage_blocks"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        if out["crf"] is None:  # configs without a CRF read as they always have
            del out["crf"]
        return out

    @classmethod
    def from_dict(cls, values):
        """A config from a mapping (e.g. :meth:`to_dict`'s or a YAML section); missing keys take the defaults.

        Raises:
            ValueError: an unknown key (the message lists the valid ones), or a bad value (naming the field).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in values if k not in names)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {names}")
        return cls(**values)

    def replace(self, **changes):
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def build(self, weights=None):
        """The :class:`deeplab_keras.DeepLabV2` this config describes.

        Args:
            weights: as ``DeepLabV2(weights=...)``: None, "imagenet", a checkpoint, a .caffemodel or .pth.

        Example:
            >>> model = ModelConfig(num_classes=3, backbone="vgg16", aspp="largefov",
            ...                     width_multiplier=0.0625).build()
        """
        from deeplab_keras.models.deeplab import DeepLabV2  # (the model imports Keras; configs do not)

        return DeepLabV2(config=self, weights=weights)
