"""Import released DeepLab v2 Caffe weights (``.caffemodel``) and deeplab-pytorch ``.pth`` files, without Caffe,
protobuf or torch: the user-facing functions over the readers (:mod:`~deeplab_keras.models.caffe_reader`,
:mod:`~deeplab_keras.models.pth`) and the name mapping (:mod:`~deeplab_keras.models.importer`).

The model is built from the :class:`~deeplab_keras.models.config.ModelConfig` the file implies (the given
arguments checked against it) by :meth:`ModelConfig.build` or the ``model_class`` passed in: this module never
imports the model module (``DeepLabV2.from_weights`` and ``DeepLabV2(weights=...)`` call it).

Example:
    >>> import deeplab_keras as dk
    >>> from deeplab_keras.models.caffe import caffemodel_config, convert_caffemodel
    >>> caffemodel_config("train2_iter_20000.caffemodel")                     # doctest: +SKIP
    {'backbone': 'resnet101', 'num_classes': 21, 'aspp': 'L', 'bn_epsilon': 1e-05}
    >>> model = convert_caffemodel("train2_iter_20000.caffemodel", "voc.keras",
    ...                            msc_scales=(1.0, 0.75, 0.5))                 # doctest: +SKIP
"""
import os

from deeplab_keras.models import pth
from deeplab_keras.models.caffe_reader import CaffeLayer, CaffeModelError, Scan, read_caffemodel, scan_caffemodel
from deeplab_keras.models.config import ModelConfig
from deeplab_keras.models.importer import analyse, config_of, describe_head, load_scan
from deeplab_keras.files import atomic_path

__all__ = ["CaffeLayer", "CaffeModelError", "Scan", "read_caffemodel", "scan_weights", "caffemodel_config",
           "load_caffemodel", "load_scan", "convert", "convert_caffemodel"]


def scan_weights(path):
    """:class:`Scan` of a ``.caffemodel``, or of a deeplab-pytorch ``.pth`` / ``.pt`` (by the suffix)."""
    if os.fspath(path).endswith((".pth", ".pt")):
        return pth.pth_scan(path)
    return scan_caffemodel(path)


def caffemodel_config(path):
    """The :class:`DeepLabV2` keyword arguments a ``.caffemodel`` implies.

    Returns:
        dict with ``backbone``; ``num_classes`` when the file has a classifier head (the COCO init's 1x1 head
        counts: 91; an ImageNet fc1000 does not); ``aspp`` ("L", "S", "largefov" or rates) when that head is a
        DeepLab v2 ASPP / LargeFOV head; ``pool5a`` (VGG-16: whether the file has the AVE pooling layer);
        ``bn_epsilon`` (ResNet: the BatchNorm eps the file uses, Caffe's default 1e-5).

    Raises:
        CaffeModelError: the file cannot be read or holds no supported network.

    Example:
        >>> cfg = caffemodel_config("train2_iter_20000.caffemodel")              # doctest: +SKIP
        >>> model = dk.DeepLabV2(**cfg, weights="train2_iter_20000.caffemodel")  # doctest: +SKIP
    """
    return config_of(analyse(scan_weights(path)))


def load_caffemodel(model, path, backbone_only=False):
    """Fill a :class:`DeepLabV2` with the weights of a ``.caffemodel``.

    The whole file is checked against the model first (one streaming pass: names, shapes, classes, ASPP
    rates, pool5a, BatchNorm eps, MSC copies), then the weights are streamed in (a second pass), so a file
    that does not fit leaves the model untouched.

    Args:
        model: a DeepLabV2 built as the file implies (see :func:`caffemodel_config`).
        path: the ``.caffemodel``.
        backbone_only: take only the backbone (ImageNet / COCO inits); the ASPP head keeps its fresh weights.

    Returns:
        report dict: ``loaded`` (Caffe layers copied, file order), ``msc_copies`` (MSC branch copies checked
        equal to their shared layers and skipped), ``ignored`` (head / classifier layers not loaded, e.g. with
        ``backbone_only``), ``zero_bias`` (Keras convs whose bias was set to 0: Caffe's has none),
        ``bn_without_scale`` (identity gamma/beta), and ``backbone``, ``num_classes``, ``aspp``, ``pool5a`` /
        ``bn_epsilon`` as the file has them.

    Raises:
        CaffeModelError: unreadable file, or it does not fit the model (the message says what to change).

    Example:
        >>> model = dk.DeepLabV2(21, "resnet101", msc_scales=(1.0, 0.75, 0.5))     # doctest: +SKIP
        >>> load_caffemodel(model, "train2_iter_20000.caffemodel")["msc_copies"][:2]  # doctest: +SKIP
        ['conv1_res075', 'bn_conv1_res075']
    """
    return load_scan(model, scan_caffemodel(path), backbone_only)


def convert(src, backbone=None, num_classes=None, msc_scales=None, backbone_only=False, *, model_class=None,
            **model_kwargs):
    """Build the DeepLabV2 a ``.caffemodel`` (or deeplab-pytorch ``.pth``) implies, the given arguments checked
    against it, and load it.

    Args:
        model_class: the class to build (``model_class(config=ModelConfig)``); None: :meth:`ModelConfig.build`'s.

    Returns:
        (model, report): see :func:`convert_caffemodel` for the arguments, :func:`load_caffemodel` for the report.
    """
    scan = scan_weights(src)
    info = analyse(scan)
    cfg = config_of(info)
    if backbone is not None and backbone != cfg["backbone"]:
        raise CaffeModelError(f"{src} holds a {cfg['backbone']} backbone, not {backbone}: use --backbone "
                              f"{cfg['backbone']}")
    if backbone_only:
        if num_classes is None:
            raise CaffeModelError("a fresh head needs its class count: pass num_classes (--num-classes)")
        for key in ("num_classes", "aspp"):
            cfg.pop(key, None)
        if cfg["backbone"] == "vgg16":
            cfg.pop("pool5a", None)
    elif num_classes is not None and "num_classes" in cfg and num_classes != cfg["num_classes"]:
        raise CaffeModelError(f"{src} holds a {cfg['num_classes']}-class head ({describe_head(info)}), not "
                              f"{num_classes} classes: use --num-classes {cfg['num_classes']}, or --backbone-only "
                              "for a fresh head")
    for key, value in model_kwargs.items():
        if key in cfg and value != cfg[key] and not (backbone_only and key == "aspp"):
            raise CaffeModelError(f"{src} implies {key}={cfg[key]!r}, not {value!r}")
    kwargs = {**cfg, **model_kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if "num_classes" not in kwargs:
        raise CaffeModelError(f"{src} has no DeepLab v2 head; pass backbone_only=True (--backbone-only) and "
                              "num_classes for a fresh head")
    config = ModelConfig.from_dict({**kwargs, "msc_scales": msc_scales})
    model = config.build() if model_class is None else model_class(config=config)
    report = load_scan(model, scan, backbone_only)
    return model, report


def check_output(out, overwrite):
    """Raise before any work when ``out`` cannot take a ``.keras`` model (wrong suffix, exists, no folder)."""
    out = os.fspath(out)
    if not out.endswith(".keras"):
        raise CaffeModelError(f"output {out} must end with .keras")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise CaffeModelError(f"output folder {folder} does not exist")
    return out


def save_keras(model, out, overwrite):
    """``model.save(out)`` atomically (a temporary file and a rename: nothing half written)."""
    with atomic_path(out, overwrite=overwrite) as tmp:
        model.save(tmp)


def convert_caffemodel(src, out=None, *, backbone=None, num_classes=None, msc_scales=None, backbone_only=False,
                       overwrite=False, **model_kwargs):
    """Build the :class:`DeepLabV2` a ``.caffemodel`` implies, load it, and optionally save it as ``.keras``.

    Args:
        src: the ``.caffemodel``.
        out: a ``.keras`` path to write (atomically; nothing is written on any error), or None.
        backbone, num_classes: checked against the file (None: take the file's); with ``backbone_only``
            ``num_classes`` is the fresh head's class count.
        msc_scales: e.g. (1.0, 0.75, 0.5) for the released MSC models (the weights are shared by all scales).
        backbone_only: load the backbone only (ImageNet / COCO inits) and keep a fresh ASPP head.
        overwrite: replace an existing ``out``.
        **model_kwargs: other DeepLabV2 arguments (e.g. ``aspp`` for a fresh head, ``dropout``).

    Returns:
        the loaded DeepLabV2.

    Raises:
        CaffeModelError: unreadable file, or arguments that contradict it.
        FileExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> model = convert_caffemodel("init.caffemodel", "coco_init.keras", num_classes=21,
        ...                            backbone_only=True)                    # doctest: +SKIP
    """
    if out is not None:
        out = check_output(out, overwrite)
    model, _ = convert(src, backbone=backbone, num_classes=num_classes, msc_scales=msc_scales,
                       backbone_only=backbone_only, **model_kwargs)
    if out is not None:
        save_keras(model, out, overwrite)
    return model
