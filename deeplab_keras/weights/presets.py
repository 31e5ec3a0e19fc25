"""The released DeepLab v2 models by name: the :data:`PRESETS` table and :class:`Preset`.

Downloading, checking and caching a preset is :mod:`deeplab_keras.weights.download`'s
(``from_preset(name)``, ``dk.DeepLabV2.from_preset``).

Example:
    >>> sorted(PRESETS)[:2]
    ['deeplab_largefov_vgg16_voc', 'deeplabv2_resnet101_coco_init']
"""
import dataclasses
import re
import urllib.parse

from deeplab_keras.models.config import ModelConfig

__all__ = ["Preset", "PRESETS", "PresetError", "register_preset", "get_preset"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PresetError(ValueError):
    """A usage error: an unknown preset name, a malformed sha256, an unusable cache folder."""


def _check_sha256(value, what):
    text = str(value).strip().lower()
    if not _SHA256.match(text):
        raise PresetError(f"{what} {value!r} is not a sha256 (64 hex digits, e.g. the output of sha256sum)")
    return text


@dataclasses.dataclass(frozen=True)
class Preset:
    """One released model: where to get it and how to convert it.

    Args:
        name: registry key.
        url: the official download URL.
        description: one line for listings and errors.
        backbone, num_classes, msc_scales, backbone_only: conversion settings (see
            :func:`deeplab_keras.weights.caffe.convert_caffemodel`).
        member: the ``.caffemodel`` inside the archive when the official file is a zip, else None.
        sha256: the sha256 of the downloaded file (the archive when ``member`` is set); None when unknown
            (then the first download that converts is pinned, see the module docstring).
        filename: the download's name in the cache (default: ``<parent folder>-<base name>`` of the URL).
        model_kwargs: further :class:`~deeplab_keras.models.config.ModelConfig` fields, e.g. ``{"aspp": "largefov"}``.

    ``preset.config`` is the :class:`~deeplab_keras.models.config.ModelConfig` of the converted model (checked when
    the preset is made; the conversion checks it against the file).
    """

    name: str
    url: str
    description: str
    backbone: str
    num_classes: int
    msc_scales: tuple = None
    backbone_only: bool = False
    member: str = None
    sha256: str = None
    filename: str = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise PresetError(f"preset name {self.name!r}: use letters, digits, '_', '.' and '-' only")
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", _check_sha256(self.sha256, f"preset {self.name} sha256"))
        if self.msc_scales is not None:
            object.__setattr__(self, "msc_scales", tuple(float(s) for s in self.msc_scales))
        if self.filename is None:
            parts = [p for p in urllib.parse.urlsplit(self.url).path.split("/") if p]
            if not parts:
                raise PresetError(f"preset {self.name}: cannot take a file name from the URL {self.url!r}")
            object.__setattr__(self, "filename", "-".join(parts[-2:]))
        try:
            self.config
        except ValueError as e:
            raise PresetError(f"preset {self.name}: {e}") from None

    @property
    def config(self):
        """The :class:`~deeplab_keras.models.config.ModelConfig` this preset converts into."""
        return ModelConfig.from_dict({**self.model_kwargs, "num_classes": self.num_classes,
                                      "backbone": self.backbone, "msc_scales": self.msc_scales})

    def conversion(self):
        """The settings that decide the converted model (stored next to the cached ``.keras``)."""
        return {"url": self.url, "member": self.member, "backbone": self.backbone, "num_classes": self.num_classes,
                "msc_scales": list(self.msc_scales) if self.msc_scales else None,
                "backbone_only": self.backbone_only, "model_kwargs": dict(self.model_kwargs)}


_RESNET101_ZIP = "http://liangchiehchen.com/projects/released/deeplab_aspp_resnet101/prototxt_and_model.zip"
_KAZUTO = "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"  # .pth state dicts
_MSC = (1.0, 0.75, 0.5)

PRESETS = {}


def register_preset(preset, *, overwrite=False):
    """Adds ``preset`` to :data:`PRESETS` (e.g. a mirror of a released file, or your own model).

    Raises:
        PresetError: the name is taken and ``overwrite`` is False.

    Example:
        >>> _ = register_preset(Preset("my_mirror", "https://example.org/x.caffemodel", "a mirror", "resnet101",
        ...                            21, msc_scales=(1.0, 0.75, 0.5)))
        >>> del PRESETS["my_mirror"]
    """
    if preset.name in PRESETS and not overwrite:
        raise PresetError(f"a preset named {preset.name!r} exists; pass overwrite=True to replace it")
    PRESETS[preset.name] = preset
    return preset


for _preset in (
        Preset("deeplabv2_resnet101_msc_voc", _RESNET101_ZIP,
               "DeepLab v2 ResNet-101 ASPP-L MSC, COCO-pretrained, trained on VOC 2012 train_aug (the paper's "
               "VOC val model: 76.35 % mIoU, 77.69 % with the CRF)",
               "resnet101", 21, msc_scales=_MSC, member="train_iter_20000.caffemodel"),
        Preset("deeplabv2_resnet101_msc_voc_trainval", _RESNET101_ZIP,
               "the same network fine-tuned further on VOC 2012 trainval_aug for the test server (79.7 % test "
               "with the CRF); it has seen VOC val: do not report val scores of it",
               "resnet101", 21, msc_scales=_MSC, member="train2_iter_20000.caffemodel"),
        Preset("deeplabv2_resnet101_coco_init", _RESNET101_ZIP,
               "ImageNet + MS-COCO pretrained ResNet-101 (the paper's initialisation for VOC): backbone only, "
               "fresh 21-class ASPP-L head, MSC; a starting point for deeplab-train",
               "resnet101", 21, msc_scales=_MSC, backbone_only=True, member="init.caffemodel"),
        Preset("deeplab_largefov_vgg16_voc",
               "http://www.cs.jhu.edu/~alanlab/ccvl/DeepLab-LargeFOV/train2_iter_8000.caffemodel",
               "DeepLab-LargeFOV (VGG-16) as released with DeepLab v1; a 'train2' snapshot (second stage, "
               "trained with VOC val by DeepLab's scripts): for predictions, not for val scores",
               "vgg16", 21, model_kwargs={"aspp": "largefov"}),
        Preset("deeplabv2_resnet101_msc_voc_kazuto", _KAZUTO + "deeplabv2_resnet101_msc-vocaug-20000.pth",
               "DeepLab v2 ResNet-101 MSC trained on VOC 2012 train_aug by kazuto1011/deeplab-pytorch from the "
               "COCO init (that port reports 76.65 % val mIoU, 77.93 % with the CRF, with its own MSC resize)",
               "resnet101", 21, msc_scales=_MSC),
        Preset("deeplabv2_resnet101_msc_cocostuff164k_kazuto",
               _KAZUTO + "deeplabv2_resnet101_msc-cocostuff164k-100000.pth",
               "DeepLab v2 ResNet-101 MSC trained on COCO-Stuff 164k (182 classes) by kazuto1011/deeplab-pytorch",
               "resnet101", 182, msc_scales=_MSC),
        Preset("deeplabv2_resnet101_msc_cocostuff10k_kazuto",
               _KAZUTO + "deeplabv2_resnet101_msc-cocostuff10k-20000.pth",
               "DeepLab v2 ResNet-101 MSC trained on COCO-Stuff 10k (182 classes) by kazuto1011/deeplab-pytorch",
               "resnet101", 182, msc_scales=_MSC),
):
    register_preset(_preset)


def get_preset(name):
    """The :class:`Preset` called ``name``.

    Raises:
        PresetError: unknown name; the message lists the known ones.
    """
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None

