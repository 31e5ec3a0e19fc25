"""Segment image files: VOC-palette index PNGs, overlays and per-image class areas (the library of
``deeplab predict``, whose command line is :mod:`deeplab_keras.cli.predict`).

Example:
    >>> import deeplab_keras as dk
    >>> from deeplab_keras.predict import predict_files
    >>> model = dk.DeepLabV2(num_classes=21, backbone="resnet50")
    >>> summary = predict_files(model, ["photo.jpg"], "masks/", overlay_images=True)   # doctest: +SKIP
"""
import contextlib
import csv
import io
import json
import os
import sys

import numpy as np
from PIL import Image

from deeplab_keras.data._common import IMAGE_EXTENSIONS, BadDataError, read_image_rgb
from deeplab_keras.data.classes import VOC_CLASSES, voc_palette
from deeplab_keras.files import atomic_write_bytes, write_error_text
from deeplab_keras.locks import exclusive_lock

MAX_PIXELS = 50_000_000  # larger images are refused (decompression bombs); --max-pixels changes it
AREAS_FILES = ("areas.json", "areas.csv")


def read_image(path, max_pixels=MAX_PIXELS):
    """Read an image file as uint8 RGB [H, W, 3] (:func:`deeplab_keras.data._common.read_image_rgb` with
    predict's pixel limit).

    Raises:
        BadDataError: naming the file: missing, dangling symlink, empty, not an image, truncated, an unsupported
            mode or more than ``max_pixels`` pixels.
    """
    return read_image_rgb(path, max_pixels)


def label_png_bytes(labels, palette=None):
    """Encode [H, W] class indices as a palette ('P' mode) PNG with ``palette`` ([256, 3] uint8; default VOC's)."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette((voc_palette() if palette is None else np.asarray(palette, np.uint8)).reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def overlay(image, labels, alpha=0.5, palette=None):
    """Side-by-side picture: the image, and the image blended with the colours of ``labels`` (``palette``
    [256, 3]; default VOC's, whose background 0 is left unblended)."""
    colours = (voc_palette() if palette is None else np.asarray(palette, np.uint8))[np.asarray(labels, dtype=np.uint8)]
    blended = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).astype(np.uint8)
    unblended = np.asarray(labels) == (0 if palette is None else 255)
    blended = np.where(unblended[..., None], image, blended)
    return np.concatenate([image, blended], axis=1)


def png_bytes(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def collect_inputs(inputs):
    """Expand files and directories (their image files, sorted; broken links included, to be reported) into a
    list of paths; a file named twice is kept once."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, n) for n in os.listdir(item) if n.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} does not exist")
    unique = {}
    for path in paths:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


class OutputNameError(ValueError):
    """Two inputs would write the same output file, or ``--out`` is not a folder; nothing was written."""


def output_names(paths, out_dir, overlay_images=False):
    """The files each input writes (``<stem>.png``, ``<stem>_overlay.png``), checked before anything is written.

    Raises:
        OutputNameError: ``out_dir`` is an existing file, or two inputs (``x.jpg`` and ``x.png``; ``x_overlay.jpg``
            and ``x.jpg`` with overlays) would write the same file; the message names both inputs.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputNameError(f"--out {out_dir} is an existing file, not a folder; choose another --out")
    owners = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        for name in [stem + ".png"] + ([stem + "_overlay.png"] if overlay_images else []):
            other = owners.setdefault(name, path)
            if other != path:
                raise OutputNameError(f"inputs {other} and {path} would both write {os.path.join(out_dir, name)}; "
                                      "rename one of them or predict them into separate --out folders")
    return owners


def read_areas(out_dir):
    """The ``areas.json`` of ``out_dir`` as {stem: {class: fraction}} ({} when there is none).

    Raises:
        ValueError: the file exists but is not such a table (it is never overwritten then).
    """
    path = os.path.join(os.fspath(out_dir), AREAS_FILES[0])
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            areas = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); move it away to start a new areas table") from None
    if not isinstance(areas, dict) or not all(isinstance(a, dict) for a in areas.values()):
        raise ValueError(f"{path} is not an areas table {{image: {{class: fraction}}}}; move it away")
    return areas


def merge_areas(out_dir, areas):
    """Add ``areas`` to ``out_dir``'s areas.json / areas.csv, keeping other images' rows (an image predicted
    again replaces its row). Runs under a lock file, so concurrent predictions into one folder lose nothing.

    Returns:
        the merged table.
    """
    out_dir = os.fspath(out_dir)
    with exclusive_lock(os.path.join(out_dir, ".areas.lock"), what=f"the areas table of {out_dir}", timeout=120):
        merged = read_areas(out_dir)
        merged.update(areas)
        merged = dict(sorted(merged.items()))
        atomic_write_bytes(os.path.join(out_dir, AREAS_FILES[0]), json.dumps(merged, indent=1).encode())
        buf = io.StringIO()
        names = sorted({n for a in merged.values() for n in a})
        writer = csv.writer(buf)
        writer.writerow(["image"] + names)
        for stem, a in merged.items():
            writer.writerow([stem] + [a.get(n, 0.0) for n in names])
        atomic_write_bytes(os.path.join(out_dir, AREAS_FILES[1]), buf.getvalue().encode())
    return merged


class SavedModelPredictor:
    """Probabilities from an exported SavedModel (``serving_default``: uint8 image -> probabilities)."""

    def __init__(self, directory):
        import tensorflow as tf
        versions = [d for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
        if not os.path.exists(os.path.join(directory, "saved_model.pb")) and versions:
            directory = os.path.join(directory, max(versions, key=int))
        signatures = tf.saved_model.load(directory).signatures
        if "serving_default" not in signatures:
            raise ValueError(f"{directory}: the SavedModel has no 'serving_default' signature (it has "
                             f"{sorted(signatures) or 'none'}); export one with deeplab-export")
        self.fn = signatures["serving_default"]

    def __call__(self, images, scales=(1.0,), flip=False):
        if tuple(scales) != (1.0,) or flip:
            raise ValueError("--scales/--flip need --checkpoint; a SavedModel predicts at scale 1 only")
        import tensorflow as tf
        return self.fn(image=tf.constant(images, tf.uint8))["probabilities"].numpy()


def predict_files(model, paths, out_dir, crf=False, overlay_images=False, scales=(1.0,), flip=False,
                  batch_size=1, overwrite=False, stop_on_error=False, max_pixels=MAX_PIXELS, class_names=None,
                  crf_params=None, progress=True, tile_size=None, tile_overlap=None, precision=None, palette=None,
                  label_ids=None):
    """Segment image files and write ``<stem>.png`` (VOC palette), optional ``<stem>_overlay.png`` and
    ``areas.json`` / ``areas.csv`` (fraction of pixels per class) into ``out_dir``.

    Output names are checked before anything is written; the areas of this run are merged into the folder's
    existing tables (:func:`merge_areas`), also when the run stops early (a full disk, Ctrl-C).

    Args:
        model: a keras model, or a callable ``(uint8 images, scales, flip) -> probabilities`` such as
            :class:`SavedModelPredictor`.
        paths: image files.
        out_dir: output folder (created).
        crf: refine the probabilities with the dense CRF op before the argmax.
        overlay_images: also write side-by-side overlays.
        scales, flip: test-time augmentation (see :func:`deeplab_keras.inference.predict_probabilities`).
        batch_size: images of the same size are run together, up to this many.
        overwrite: replace existing outputs; otherwise an existing output is an error for that image.
        stop_on_error: raise on the first bad image instead of reporting and skipping it.
        max_pixels: images over this many pixels are refused.
        class_names: names for the areas table (default: VOC's when 21 classes, else class_<i>).
        palette: [256, 3] uint8 colours of the masks and overlays (default VOC's; a dataset's:
            ``deeplab_keras.data.dataset_info(name).palette``).
        label_ids: [256] uint8 table class index -> the id written instead, as a grayscale PNG (e.g.
            ``data.classes.cityscapes_train_to_label_ids()``: Cityscapes labelIds for the benchmark server).
        crf_params: a :class:`deeplab_keras.crf.CRFParams`, a dict of some of its fields, or None (the defaults).
        progress: show a progress bar.
        tile_size, tile_overlap: predict overlapping tiles of this size (an int or (h, w)), overlapping by
            ``tile_overlap`` (None: ``inference.DEFAULT_TILE_OVERLAP``), and blend them
            (``deeplab_keras.inference.tiled_probabilities``; also for a SavedModel); the CRF runs on the stitched
            probabilities.
        precision: "float32" (None) or "bf16" (a bfloat16 copy of a keras model on a CPU with native
            bfloat16: ``deeplab_keras.precision``; a ValueError for a SavedModel or elsewhere).

    Returns:
        dict with ``written`` (stems), ``failed`` ({path: reason}) and ``areas`` (this run's).

    Raises:
        OutputNameError: ``out_dir`` is a file or two inputs would write the same file (nothing written).
        RuntimeError: an output could not be written (e.g. a full disk); the message names the file.
    """
    from deeplab_keras.inference import check_tiling

    tiling = check_tiling(tile_size, tile_overlap)  # a bad tile size fails before anything is read or written
    output_names(paths, out_dir, overlay_images)
    read_areas(out_dir)  # refuse an unreadable areas table before predicting, not after
    os.makedirs(out_dir, exist_ok=True)
    run = _probability_fn(model, scales, flip, precision)
    written, failed, areas = [], {}, {}

    def skip(path, err, reason):  # a bad input file or an existing output: report it and go on
        if stop_on_error:
            raise err
        failed[path] = reason
        print(f"skipped {reason}", file=sys.stderr)

    with _areas_merged_on_exit(out_dir, areas):
        for batch in _same_size_batches(paths, max_pixels, batch_size, progress, skip):
            images = np.stack([img for _, img in batch])
            probs = _probabilities(run, images, scales, flip, crf, crf_params, tiling)
            for (path, image), p in zip(batch, probs):
                stem = os.path.splitext(os.path.basename(path))[0]
                labels = p.argmax(-1).astype(np.uint8)
                try:
                    _write_outputs(out_dir, stem, image, labels, overlay_images, overwrite, palette, label_ids)
                except FileExistsError as err:
                    skip(path, err, f"{path}: {err}")
                    continue
                areas[stem] = _class_areas(labels, p.shape[-1], class_names)
                written.append(stem)
    return {"written": written, "failed": failed, "areas": areas}


def _probability_fn(model, scales, flip, precision=None):
    """``(uint8 images, scales, flip) -> probabilities`` for a keras model or a callable such as a predictor."""
    if callable(model) and not hasattr(model, "layers"):
        if precision not in (None, "float32"):
            raise ValueError(f"precision {precision!r} needs a keras model (--checkpoint / --preset); a SavedModel "
                             "runs in float32")
        return model
    from deeplab_keras.inference import Predictor
    predictor = Predictor(model, scales, flip, precision=precision)  # one traced function for every size

    def run(images, scales, flip):
        return predictor(images).numpy()
    return run


def _same_size_batches(paths, max_pixels, batch_size, progress, skip):
    """Yields lists of (path, image) of one image size, up to batch_size; an unreadable file goes to skip."""
    from tqdm import tqdm
    pending = []
    for path in tqdm(paths, desc="predict", unit="img", disable=not progress):
        try:
            image = read_image(path, max_pixels)
        except BadDataError as err:
            skip(path, err, str(err))
            continue
        if pending and (pending[0][1].shape != image.shape or len(pending) >= batch_size):
            yield pending
            pending = []
        pending.append((path, image))
    if pending:
        yield pending


def _probabilities(run, images, scales, flip, crf, crf_params, tiling=(None, None)):
    """The model's probabilities for a batch of images (tile by tile when ``tiling`` = ``(tile_size, overlap)``
    has a size), refined by the dense CRF op when ``crf``."""
    if tiling[0] is None:
        probs = run(images, scales, flip)
    else:
        from deeplab_keras.inference import tiled_probabilities
        probs = tiled_probabilities(lambda tile: run(tile, scales, flip), images, *tiling)
    if crf:
        from deeplab_keras import crf as crf_module
        probs = np.asarray(crf_module.dense_crf(probs, images, crf_params))
    return probs


def _write_outputs(out_dir, stem, image, labels, overlay_images, overwrite, palette=None, label_ids=None):
    """Writes ``<stem>.png`` (palette PNG, or grayscale ``label_ids[labels]``) and ``<stem>_overlay.png``; a disk
    error is a RuntimeError naming the file."""
    target = os.path.join(out_dir, stem + ".png")
    try:
        if label_ids is not None:
            mask = png_bytes(np.asarray(label_ids, np.uint8)[labels])
        else:  # one argument for the VOC palette (the call tests intercept)
            mask = label_png_bytes(labels) if palette is None else label_png_bytes(labels, palette)
        atomic_write_bytes(target, mask, overwrite)
        if overlay_images:
            target = os.path.join(out_dir, stem + "_overlay.png")
            atomic_write_bytes(target, png_bytes(overlay(image, labels, palette=palette)), overwrite)
    except FileExistsError:
        raise
    except OSError as err:  # a full disk, a read-only folder: stop (the next image would fail as well)
        raise RuntimeError(f"cannot write {target}: {write_error_text(err, out_dir)}") from err


def _class_areas(labels, num_classes, class_names):
    """{class name: fraction of pixels} of the classes present in ``labels``."""
    names = class_names or (VOC_CLASSES if num_classes == 21 else [f"class_{i}" for i in range(num_classes)])
    counts = np.bincount(labels.reshape(-1), minlength=num_classes)
    return {names[i]: round(float(c) / labels.size, 6) for i, c in enumerate(counts) if c}


@contextlib.contextmanager
def _areas_merged_on_exit(out_dir, areas):
    """Merges ``areas`` into out_dir's tables at the end, also when the run stops early (then best effort)."""
    try:
        yield
    except BaseException:
        if areas:  # keep the areas of the masks already written; the original error is what gets reported
            with contextlib.suppress(Exception):
                merge_areas(out_dir, areas)
        raise
    if areas:
        merge_areas(out_dir, areas)
