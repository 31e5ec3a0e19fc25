"""The one description of a DeepLab v2 model (:class:`ModelConfig`), checked against the constants of
:mod:`deeplab_keras.architecture`. Standard library only: it imports no Keras and no TensorFlow, so configs can be
read, checked and written on any backend (or none)."""
import collections.abc
import dataclasses
from typing import ClassVar, Optional, Tuple, Union

from deeplab_keras.architecture import (ASPP_RATES, BACKBONES, CAFFE_BN_EPSILON, OUTPUT_STRIDES, RESNET_BLOCKS,
                                        check_output_stride, interp_factors, resolve_rates)
from deeplab_keras.config_base import ConfigBase, is_int, is_number


def _checks(check, value):
    """True when ``check(value)`` raises no ValueError."""
    try:
        check(value)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class CRFConfig(ConfigBase):
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

    SECTION: ClassVar[str] = "model.crf"
    trainable: bool = True
    compatibility: bool = True
    freeze_network: bool = False
    iterations: int = 5
    bilateral_weight: Optional[float] = None
    bilateral_xy_std: Optional[float] = None
    bilateral_rgb_std: Optional[float] = None
    gaussian_weight: Optional[float] = None
    gaussian_xy_std: Optional[float] = None

    def validate(self):
        self._bools("trainable", "compatibility", "freeze_network")
        self.params()  # checks the CRF parameters (CRFParams' message)

    def params(self):
        """The :class:`deeplab_keras.crf.CRFParams` (imported here: the CRF package imports Keras)."""
        from deeplab_keras.crf.params import CRFParams

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name in CRFParams.keys() and getattr(self, f.name) is not None}
        try:
            return CRFParams(**values)
        except ValueError as err:  # "crf.<key> must be ..." -> "model.crf.<key> must be ..."
            raise ValueError(f"model.{err}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigBase):
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

    SECTION: ClassVar[str] = "model"
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
        if isinstance(self.crf, collections.abc.Mapping):
            object.__setattr__(self, "crf", CRFConfig.from_dict(self.crf))
        self._need(self.crf is None or isinstance(self.crf, CRFConfig), "crf",
                   "null or a mapping of CRFConfig keys (e.g. {trainable: true, iterations: 5})")
        for name in ("aspp", "msc_scales", "stage_blocks"):  # any sequence (a numpy array too) as a tuple
            value = getattr(self, name)
            if not isinstance(value, (str, bytes, dict)) and hasattr(value, "__iter__"):
                object.__setattr__(self, name, tuple(value))
        super().__post_init__()  # numpy scalars -> Python, validate()
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
        """Raise ValueError naming the first bad field (``model.<key> must be ..., got ...``)."""
        self._need(is_int(self.num_classes) and self.num_classes >= 1, "num_classes",
                   "a positive integer (21 for PASCAL VOC)")
        self._need(self.backbone in BACKBONES, "backbone", f"one of {BACKBONES}")
        self._need(_checks(check_output_stride, self.output_stride), "output_stride",
                   f"one of {OUTPUT_STRIDES} (8 = the paper's dense setting, 32 = the plain ImageNet network)")
        self._need(_checks(resolve_rates, self.aspp), "aspp", f"'L' {ASPP_RATES['L']}, 'S' {ASPP_RATES['S']}, "
                   "'largefov' (VGG-16 only) or a tuple of positive integer dilation rates")
        self._need(not (isinstance(self.aspp, str) and self.aspp.upper() == "LARGEFOV") or self.backbone == "vgg16",
                   "aspp", "'L', 'S' or a tuple of rates with a ResNet backbone ('largefov' is the VGG-16 head)")
        scales = self.msc_scales
        self._need(scales is None or isinstance(scales, tuple) and scales and 1.0 in scales and all(
            is_number(s) and s > 0 and _checks(interp_factors, s) for s in scales), "msc_scales",
            "null or positive scales that include 1.0, each a ratio of small integers (e.g. [1.0, 0.75, 0.5])")
        self._numbers(0, "width_multiplier", strict=True)
        blocks = self.stage_blocks
        self._need(blocks is None or self.backbone != "vgg16", "stage_blocks",
                   "null with vgg16 (it applies to ResNet backbones only)")
        self._need(blocks is None or isinstance(blocks, tuple) and len(blocks) == 4 and all(
            is_int(b) and b >= 1 for b in blocks), "stage_blocks",
            f"4 positive block counts (conv2..conv5), e.g. {list(RESNET_BLOCKS['resnet50'])}")
        self._need(is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        self._numbers(0, "bn_epsilon", strict=True)
        self._need(self.pool5a is None or isinstance(self.pool5a, bool), "pool5a", "null, true or false")
        self._need(not self.pool5a or self.backbone == "vgg16", "pool5a",
                   "null with a ResNet backbone (True is the VGG-16 DeepLab-LargeFOV layer)")
        return resolve_rates(self.aspp)

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
        """The fields as plain JSON / YAML types (lists, not tuples; no ``crf`` key without a CRF)."""
        out = super().to_dict()
        if out["crf"] is None:  # configs without a CRF read as they always have
            del out["crf"]
        return out

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
