"""Weight transfer and loading: keras.applications ImageNet backbones, checkpoints, float32 copies."""
import glob
import os
import re
import sys

import keras
import numpy as np

from deeplab_keras import _keras_compat
from deeplab_keras.weights.convert import load_scan, scan_weights

_APPLICATIONS = {"resnet50": "ResNet50", "resnet101": "ResNet101", "vgg16": "VGG16"}


def imagenet_reference(backbone, weights="imagenet"):
    """The keras.applications model whose weights DeepLab's backbone takes (ImageNet weights are downloaded
    by Keras into ``~/.keras/models`` on first use). VGG-16 comes with its top: fc6/fc7 are decimated from it.

    Args:
        backbone: "resnet50", "resnet101" or "vgg16".
        weights: "imagenet" or None (random weights: used by tests to prove the mapping offline).
    """
    cls = getattr(keras.applications, _APPLICATIONS[backbone])
    return cls(include_top=(backbone == "vgg16"), weights=weights)


def transfer_backbone_weights(model, source):
    """Copy every weighted layer of ``source`` (a keras.applications model) into the layer of the same name in
    ``model.network``; VGG-16's fc1/fc2 are decimated into each fc6/fc7 branch as in DeepLab-LargeFOV
    (7x7x4096 -> 3x3x1024 by taking every 3rd tap and every 4th channel).

    Args:
        model: a :class:`deeplab_keras.DeepLabV2`.
        source: keras.applications ResNet50 / ResNet101 / VGG16 model.

    Returns:
        list of the layer names that were copied.

    Raises:
        ValueError: a backbone layer is missing from ``source`` or its shapes differ (e.g. width_multiplier != 1).
    """
    network = model.network
    names = {layer.name for layer in network.layers if layer.weights}
    copied = []
    for layer in source.layers:
        if not layer.weights or layer.name not in names:
            continue
        target = network.get_layer(layer.name)
        for src, dst in zip(layer.get_weights(), target.get_weights()):
            if src.shape != dst.shape:
                raise ValueError(f"cannot transfer layer {layer.name!r}: source shape {src.shape} != model shape "
                                 f"{dst.shape}; ImageNet weights need width_multiplier=1.0 and the real depth")
        target.set_weights(layer.get_weights())
        copied.append(layer.name)
    missing = sorted(names - set(copied) - {"aspp"})
    if missing:
        raise ValueError(f"the reference model has no layers named {missing[:5]}...; is it the "
                         f"keras.applications {_APPLICATIONS[model.backbone]}?")
    names_in_source = {layer.name for layer in source.layers}
    if model.backbone == "vgg16" and {"fc1", "fc2"} <= names_in_source:
        fc1_w, fc1_b = source.get_layer("fc1").get_weights()
        fc2_w, fc2_b = source.get_layer("fc2").get_weights()
        fc6 = (fc1_w.reshape(7, 7, 512, 4096)[::3, ::3, :, ::4], fc1_b[::4])
        fc7 = (fc2_w[::4, ::4].reshape(1, 1, 1024, 1024), fc2_b[::4])
        for branch in network.get_layer("aspp").branches:
            if branch[0].kernel.shape == fc6[0].shape:
                branch[0].set_weights(fc6)
                branch[2].set_weights(fc7)
                copied += [branch[0].name, branch[2].name]
    return copied


def keras_file_problem(path):
    """Why the ``.keras`` file ``path`` cannot hold a saved model, or None when its archive is intact.

    Checks what a truncated, overwritten or hand-made file gets wrong, without building the model: a zip
    archive, a ``config.json`` that parses, a ``model.weights.*`` entry, and every entry's CRC.

    Example:
        >>> keras_file_problem("runs/tiny/model.keras")   # doctest: +SKIP
    """
    import json
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                return "has no config.json (it is not a Keras model archive)"
            if not any(name.startswith("model.weights") for name in names):
                return "has no model.weights.h5 (it is not a Keras model archive)"
            bad = archive.testzip()
            if bad is not None:
                return f"is corrupt ({bad} fails its CRC check)"
            json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        return f"is not a readable Keras model archive ({e}; truncated or overwritten?)"
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # unreadable file, bad JSON
        return f"cannot be read ({' '.join(str(e).split())})"
    return None


def resolve_checkpoint(path):
    """Turn a `.keras` / `.weights.h5` file or a training run directory into the file to load.

    A directory resolves to ``model.keras`` if present and intact, else to the newest intact
    ``checkpoints/ckpt-<step>.keras`` (saying on stderr which file it skipped and why).

    Raises:
        FileNotFoundError: no such file, or a directory without a model.
        ValueError: a file that is not an intact ``.keras`` archive / not a ``.weights.h5`` (the message names
            the file and what is wrong); a run directory without any intact model.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        final = os.path.join(path, "model.keras")
        ckpts = glob.glob(os.path.join(path, "checkpoints", "ckpt-*.keras")) + glob.glob(
            os.path.join(path, "ckpt-*.keras"))
        ckpts.sort(key=lambda p: int(re.findall(r"ckpt-(\d+)", p)[-1]), reverse=True)
        candidates = ([final] if os.path.isfile(final) else []) + ckpts
        if not candidates:
            raise FileNotFoundError(f"no model.keras or checkpoints/ckpt-<step>.keras in directory {path!r}; "
                                    "pass a .keras file or a deeplab-train run directory")
        skipped = []
        for candidate in candidates:
            problem = keras_file_problem(candidate)
            if problem is None:
                if skipped:
                    print(f"deeplab_keras: {'; '.join(skipped)}: using the newest intact model {candidate}",
                          file=sys.stderr)
                return candidate
            skipped.append(f"{candidate} {problem}")
        raise ValueError(f"no intact model in run directory {path!r}: {skipped[0]}"
                         + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else "")
                         + "; retrain, or pass another checkpoint")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass a .keras file, a .weights.h5 file "
                                "or a deeplab-train run directory")
    if path.endswith(".keras"):
        problem = keras_file_problem(path)
        if problem is not None:
            raise ValueError(f"checkpoint {path!r} {problem}; pass an intact .keras file or a deeplab-train run "
                             "directory")
    elif not path.endswith(".weights.h5"):
        raise ValueError(f"checkpoint {path!r} is neither a .keras nor a .weights.h5 file")
    return path


def load_model(path, compile=False):
    """Load a DeepLabV2 from a `.keras` file or a training run directory (``safe_mode=True``).

    Raises:
        FileNotFoundError, ValueError: see :func:`resolve_checkpoint`; also a ValueError naming the file when
            Keras cannot rebuild the model it holds.

    Example:
        >>> model = load_model("runs/tiny")            # doctest: +SKIP
    """
    path = resolve_checkpoint(path)
    if path.endswith(".weights.h5"):
        raise ValueError(f"{path!r} holds weights only; build the model with dk.DeepLabV2(..., weights={path!r})")
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as e:  # Keras raises ValueError / TypeError / KeyError / OSError for a model it cannot build
        raise ValueError(f"cannot load the model in {path!r}: {' '.join(str(e).split())[:300]}") from e


def load_weights_into(model, weights):
    """Fill ``model`` from ``weights``: "imagenet", a released DeepLab v2 ``.caffemodel`` or deeplab-pytorch
    ``.pth`` (see :mod:`deeplab_keras.weights.caffe`), or a checkpoint path (see :func:`resolve_checkpoint`)."""
    if isinstance(weights, str) and weights == "imagenet":
        transfer_backbone_weights(model, imagenet_reference(model.backbone))
        return model
    if isinstance(weights, (str, os.PathLike)) and os.fspath(weights).endswith((".caffemodel", ".pth", ".pt")):
        load_scan(model, scan_weights(weights))
        return model
    path = resolve_checkpoint(weights)
    if path.endswith(".keras"):
        source = load_model(path)
        for a, b in zip(model.weights, source.weights):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"checkpoint {path!r} does not fit this model: {b.path} has shape {b.shape}, "
                                 f"the model's {a.path} has {a.shape}; build the model with the checkpoint's config")
        if len(model.weights) != len(source.weights):
            raise ValueError(f"checkpoint {path!r} has {len(source.weights)} weights, the model {len(model.weights)}")
        model.set_weights(source.get_weights())
    else:
        model.load_weights(path)
    return model


def is_float32(model):
    """True when every layer of ``model`` computes and stores in float32 (no mixed-precision policy anywhere)."""
    layers = [model] + _keras_compat.flatten_layers(model)
    for layer in layers:
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and (policy.compute_dtype != "float32" or policy.variable_dtype != "float32"):
            return False
    return True


def as_float32(model):
    """``model`` in float32: ``model`` itself when it already is, else a float32 rebuild (e.g. of a model trained
    under ``mixed_float16`` / ``mixed_bfloat16``) with the same weights, for saving and export.

    Raises:
        ValueError: the rebuilt model still holds a non-float32 layer (a custom layer that pins its own policy).

    Example:
        >>> fp32 = as_float32(model)                  # doctest: +SKIP
    """
    if is_float32(model):
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        config = model.get_config()
        copy = model.__class__.from_config(config)
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights([np.asarray(w, dtype=np.float32) if np.asarray(w).dtype.kind == "f" else w
                      for w in model.get_weights()])
    if not is_float32(copy):
        raise ValueError(f"could not rebuild the mixed-precision model {getattr(model, 'name', '')!r} in float32 "
                         "(a layer keeps its own dtype policy); build and save the model in float32 instead")
    return copy
