"""Import released DeepLab v2 Caffe weights (``.caffemodel``) without Caffe or protobuf: the user-facing
functions over the reader (:mod:`~deeplab_keras.weights.caffe_reader`) and the name mapping
(:mod:`~deeplab_keras.weights.importer`); :mod:`~deeplab_keras.weights.convert` builds and fills the model (from
a ``.caffemodel`` or a deeplab-pytorch ``.pth``).

Example:
    >>> import deeplab_keras as dk
    >>> from deeplab_keras.weights.caffe import caffemodel_config, convert_caffemodel
    >>> caffemodel_config("train2_iter_20000.caffemodel")                     # doctest: +SKIP
    {'backbone': 'resnet101', 'num_classes': 21, 'aspp': 'L', 'bn_epsilon': 1e-05}
    >>> model = convert_caffemodel("train2_iter_20000.caffemodel", "voc.keras",
    ...                            msc_scales=(1.0, 0.75, 0.5))                 # doctest: +SKIP
"""
from deeplab_keras.weights.caffe_reader import CaffeModelError, read_caffemodel, scan_caffemodel
from deeplab_keras.weights.convert import check_output, convert, save_keras, scan_weights
from deeplab_keras.weights.importer import analyse, config_of, load_scan

__all__ = ["CaffeModelError", "read_caffemodel", "caffemodel_config", "load_caffemodel", "convert_caffemodel"]


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
