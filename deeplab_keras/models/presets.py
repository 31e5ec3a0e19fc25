"""The released DeepLab v2 models by name: download once, check the hash, convert once, cache the ``.keras``.

``from_preset(name)`` (also ``dk.DeepLabV2.from_preset``, ``deeplab-predict --preset`` and
``deeplab-eval --preset``) resolves ``name`` in :data:`PRESETS`, downloads the official file with
``keras.utils.get_file`` into ``<cache_dir>/models/deeplab_keras/`` (``cache_dir`` defaults to the Keras cache,
``$KERAS_HOME`` or ``~/.keras``), checks its sha256, takes the ``.caffemodel`` out of the archive when the
official file is a zip, converts it (a ``.caffemodel``, or a deeplab-pytorch ``.pth``) with
:func:`deeplab_keras.models.caffe.convert_caffemodel` and keeps the result as ``<name>.keras``, next to
``<name>.keras.json`` (the settings and the source's sha256). Later calls load that ``.keras`` without touching
the network. The downloads are kept (several presets share one archive); delete the folder to reclaim the space.

Hashes. The authors published no checksums, and no stored source gives the sha256 of the official files, so
the registry records them as unknown (``sha256=None``) rather than inventing any. For such a preset the first
download is **pinned**: its sha256 is printed and written to ``pins.json`` in the cache folder, and every later
download of that file (after the cache was cleared, or on another preset sharing the archive) must match it.
Pass ``sha256=`` (``--preset-sha256``) to require a hash you obtained and trust. A download that does not match
the expected hash (the registry's, yours or the pinned one) is deleted and raises :class:`PresetHashError`;
nothing is cached from it. The downloaded files are only parsed as data (our own protobuf reader, a restricted
unpickler for ``.pth``; a zip member is found by its name and streamed to a file name of ours), never executed.

Example:
    >>> import deeplab_keras as dk
    >>> model = dk.DeepLabV2.from_preset("deeplabv2_resnet101_msc_voc")   # doctest: +SKIP
    >>> sorted(PRESETS)[:2]
    ['deeplab_largefov_vgg16_voc', 'deeplabv2_resnet101_coco_init']
"""
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import urllib.parse
import zipfile

from deeplab_keras.models.caffe import convert_caffemodel
from deeplab_keras.models.config import ModelConfig
from deeplab_keras.models.weights import load_model
from deeplab_keras.utils import TEMP_PREFIX, atomic_write_json, exclusive_lock, remove_temp_files

__all__ = ["Preset", "PRESETS", "PresetError", "PresetFetchError", "PresetHashError", "register_preset", "get_preset",
           "preset_path", "from_preset", "cache_folder"]

CACHE_SUBDIR = os.path.join("models", "deeplab_keras")
PINS_FILE = "pins.json"
LOCK_TIMEOUT_S = 3 * 3600  # another process downloading/converting: wait for it this long
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PresetError(ValueError):
    """A usage error: an unknown preset name, a malformed sha256, an unusable cache folder."""


class PresetFetchError(RuntimeError):
    """A runtime failure: the download failed, or the archive lacks the expected member."""


class PresetHashError(PresetFetchError):
    """The downloaded file's sha256 differs from the expected one; the file was deleted, nothing was cached."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """One released model: where to get it and how to convert it.

    Args:
        name: registry key.
        url: the official download URL.
        description: one line for listings and errors.
        backbone, num_classes, msc_scales, backbone_only: conversion settings (see
            :func:`deeplab_keras.models.caffe.convert_caffemodel`).
        member: the ``.caffemodel`` inside the archive when the official file is a zip, else None.
        sha256: the sha256 of the downloaded file (the archive when ``member`` is set); None when unknown
            (then the first download is pinned, see the module docstring).
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


def cache_folder(cache_dir=None):
    """The folder that holds the downloads, ``pins.json`` and the converted ``.keras`` files."""
    if cache_dir is None:  # Keras' cache: $KERAS_HOME (read at call time) or ~/.keras
        cache_dir = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), CACHE_SUBDIR)


def preset_path(name, cache_dir=None, *, sha256=None):
    """Path of the converted ``.keras`` of preset ``name``: downloaded, checked and converted on first use.

    Args:
        name: a key of :data:`PRESETS` (or a :class:`Preset`).
        cache_dir: cache root (default: the Keras cache, ``$KERAS_HOME`` or ``~/.keras``).
        sha256: the sha256 you trust for the downloaded file; overrides the registry's and the pinned one.

    Raises:
        PresetError: (ValueError) unknown name, malformed ``sha256``, cache folder not writable.
        PresetFetchError: (RuntimeError) failed download, archive without the member;
            :class:`PresetHashError` when the download does not match the expected sha256 (it was deleted).
        deeplab_keras.models.caffe.CaffeModelError: the file does not convert.

    Example:
        >>> path = preset_path("deeplabv2_resnet101_msc_voc")     # doctest: +SKIP
    """
    preset = get_preset(name)
    if sha256 is not None:
        sha256 = _check_sha256(sha256, "sha256")
    folder = cache_folder(cache_dir)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise PresetError(f"cannot create the preset cache {folder} ({err.strerror}); pass cache_dir= "
                          "or set KERAS_HOME to a writable folder") from None
    target = os.path.join(folder, f"{preset.name}.keras")
    with exclusive_lock(os.path.join(folder, ".presets.lock"), what=f"the preset cache {folder}",
                        timeout=LOCK_TIMEOUT_S):
        remove_temp_files(folder, (".partial-", TEMP_PREFIX))  # of a killed download (we hold the lock)
        pins = _read_json(os.path.join(folder, PINS_FILE)) or {}
        expected = sha256 or preset.sha256 or (pins.get(preset.filename) or {}).get("sha256")
        meta = _read_json(target + ".json")
        if (os.path.isfile(target) and meta and meta.get("conversion") == preset.conversion()
                and (expected is None or meta.get("source_sha256") == expected)):
            return target
        download, actual = _download(preset, folder, expected, sha256)
        if expected is None:
            pins[preset.filename] = {"sha256": actual, "url": preset.url,
                                     "pinned": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                         timespec="seconds")}
            atomic_write_json(os.path.join(folder, PINS_FILE), pins)
            _say(f"{preset.filename}: no published sha256; pinned {actual} in {os.path.join(folder, PINS_FILE)} "
                 "(later downloads of this file must match it; compare it with a hash you trust)")
        _convert(preset, download, target)
        atomic_write_json(target + ".json", {"preset": preset.name, "source_sha256": actual,
                                             "conversion": preset.conversion()})
        return target


def from_preset(name, cache_dir=None, *, sha256=None):
    """The released model ``name`` as a :class:`deeplab_keras.DeepLabV2` (see :func:`preset_path`).

    Example:
        >>> model = from_preset("deeplabv2_resnet101_msc_voc")     # doctest: +SKIP
    """
    return load_model(preset_path(name, cache_dir, sha256=sha256))


def _check_sha256(value, what):
    text = str(value).strip().lower()
    if not _SHA256.match(text):
        raise PresetError(f"{what} {value!r} is not a sha256 (64 hex digits, e.g. the output of sha256sum)")
    return text


def _say(message):
    print(f"deeplab_keras presets: {message}", file=sys.stderr, flush=True)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(preset, folder, expected, user_sha256):
    """The verified download in ``folder`` (fetched unless a copy with the expected hash is there) and its sha256."""
    import keras

    final = os.path.join(folder, preset.filename)
    if os.path.isfile(final):
        actual = _sha256_file(final)
        if expected is None or actual == expected:
            return final, actual
        _say(f"{final}: sha256 {actual} is not the expected {expected}; downloading it again")
        os.remove(final)
    partial = f".partial-{os.getpid()}-{preset.filename}"
    _say(f"preset {preset.name}: downloading {preset.url}")
    try:
        path = keras.utils.get_file(fname=partial, origin=preset.url, cache_subdir=folder)
    except (Exception, KeyboardInterrupt) as err:  # get_file removes its partial file, raises plain Exception
        _remove(os.path.join(folder, partial))
        if isinstance(err, KeyboardInterrupt):
            raise
        raise PresetFetchError(f"preset {preset.name}: download of {preset.url} failed ({err}); check the network, or "
                          "download the file yourself and convert it with deeplab-convert") from None
    actual = _sha256_file(path)
    if expected is not None and actual != expected:
        _remove(path)
        source = ("--preset-sha256 / sha256=" if user_sha256 else
                  "the registry" if preset.sha256 else f"the hash pinned in {os.path.join(folder, PINS_FILE)}")
        raise PresetHashError(f"preset {preset.name}: {preset.url} has sha256 {actual}, expected {expected} (from "
                              f"{source}); the download was deleted and nothing was cached")
    os.replace(path, final)
    return final, actual


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _convert(preset, download, target):
    """Converts ``download`` (or its zip member) into ``target`` atomically; the extracted member is removed."""
    source, extracted = download, None
    if preset.member is not None:
        extracted = os.path.join(os.path.dirname(target), f".partial-{os.getpid()}-{preset.name}.caffemodel")
        _extract_member(download, preset, extracted)
        source = extracted
    _say(f"preset {preset.name}: converting {os.path.basename(download)}"
         + (f" ({preset.member})" if preset.member else "") + f" -> {target}")
    try:  # convert_caffemodel writes the .keras atomically
        convert_caffemodel(source, target, backbone=preset.backbone, num_classes=preset.num_classes,
                           msc_scales=preset.msc_scales, backbone_only=preset.backbone_only, overwrite=True,
                           **preset.model_kwargs)
    finally:
        if extracted is not None:
            _remove(extracted)


def _extract_member(archive, preset, out):
    """Streams the member of ``archive`` whose base name is ``preset.member`` into ``out``."""
    try:
        with zipfile.ZipFile(archive) as z:
            infos = [i for i in z.infolist() if not i.is_dir() and os.path.basename(i.filename) == preset.member]
            if len(infos) != 1:
                found = sorted(i.filename for i in z.infolist() if i.filename.endswith(".caffemodel"))
                raise PresetFetchError(f"preset {preset.name}: {archive} holds {len(infos) or 'no'} member(s) named "
                                  f"{preset.member!r}; its .caffemodel members: {found or 'none'}")
            with z.open(infos[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        _remove(out)
        raise PresetFetchError(f"preset {preset.name}: {archive} is not a readable zip archive ({err}); delete it and "
                          "try again") from None
    except BaseException:
        _remove(out)
        raise
