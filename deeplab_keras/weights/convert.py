"""Build the DeepLabV2 a weights file implies and fill it: a ``.caffemodel`` or a deeplab-pytorch ``.pth``
(read by :mod:`~deeplab_keras.weights.caffe_reader` / :mod:`~deeplab_keras.weights.pth`, mapped by
:mod:`~deeplab_keras.weights.importer`).

The model is built from the :class:`~deeplab_keras.models.config.ModelConfig` the file implies (the given
arguments checked against it) by :meth:`ModelConfig.build` or the ``model_class`` passed in.
"""
import os

from deeplab_keras.files import atomic_path
from deeplab_keras.models.config import ModelConfig
from deeplab_keras.weights import pth
from deeplab_keras.weights.caffe_reader import CaffeModelError, scan_caffemodel
from deeplab_keras.weights.importer import analyse, config_of, describe_head, load_scan

__all__ = ["scan_weights", "convert", "check_output", "save_keras"]


def scan_weights(path):
    """:class:`Scan` of a ``.caffemodel``, or of a deeplab-pytorch ``.pth`` / ``.pt`` (by the suffix)."""
    if os.fspath(path).endswith((".pth", ".pt")):
        return pth.pth_scan(path)
    return scan_caffemodel(path)


def convert(src, backbone=None, num_classes=None, msc_scales=None, backbone_only=False, *, model_class=None,
            **model_kwargs):
    """Build the DeepLabV2 a ``.caffemodel`` (or deeplab-pytorch ``.pth``) implies, the given arguments checked
    against it, and load it.

    Args:
        model_class: the class to build (``model_class(config=ModelConfig)``); None: :meth:`ModelConfig.build`'s.

    Returns:
        (model, report): see :func:`~deeplab_keras.weights.caffe.convert_caffemodel` for the arguments,
        :func:`~deeplab_keras.weights.caffe.load_caffemodel` for the report.
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
