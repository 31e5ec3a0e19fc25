"""Segment image files: VOC-palette index PNGs, overlays and per-image class areas (``deeplab-predict``).

Example:
    >>> import deeplab_keras as dk
    >>> from deeplab_keras.predict import predict_files
    >>> model = dk.DeepLabV2(num_classes=21, backbone="resnet50")
    >>> summary = predict_files(model, ["photo.jpg"], "masks/", overlay_images=True)   # doctest: +SKIP
"""
import argparse
import contextlib
import csv
import io
import json
import os
import sys

import numpy as np
from PIL import Image

from deeplab_keras.data._common import IMAGE_EXTENSIONS, BadDataError, read_image_rgb
from deeplab_keras.utils import (VOC_CLASSES, atomic_write_bytes, exclusive_lock, quiet_tensorflow, run_command,
                                 usage_error, voc_palette)

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


def label_png_bytes(labels):
    """Encode [H, W] class indices as a palette ('P' mode) PNG with the VOC colours."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def overlay(image, labels, alpha=0.5):
    """Side-by-side picture: the image, and the image blended with the VOC colours of ``labels``."""
    colours = voc_palette()[np.asarray(labels, dtype=np.uint8)]
    blended = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).astype(np.uint8)
    blended = np.where(np.asarray(labels)[..., None] == 0, image, blended)
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
                  crf_params=None, progress=True):
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
        crf_params: keyword arguments for :func:`deeplab_keras.crf.dense_crf`.
        progress: show a progress bar.

    Returns:
        dict with ``written`` (stems), ``failed`` ({path: reason}) and ``areas`` (this run's).

    Raises:
        OutputNameError: ``out_dir`` is a file or two inputs would write the same file (nothing written).
        RuntimeError: an output could not be written (e.g. a full disk); the message names the file.
    """
    from tqdm import tqdm

    from deeplab_keras.inference import Predictor
    output_names(paths, out_dir, overlay_images)
    read_areas(out_dir)  # refuse an unreadable areas table before predicting, not after
    os.makedirs(out_dir, exist_ok=True)
    if callable(model) and not hasattr(model, "layers"):
        run = model
    else:
        predictor = Predictor(model, scales, flip)  # one traced function for every image size and batch

        def run(images, scales, flip):
            return predictor(images).numpy()
    written, failed, areas = [], {}, {}
    pending = []

    def skip(path, err, reason):  # a bad input file or an existing output: report it and go on
        if stop_on_error:
            raise err
        failed[path] = reason
        print(f"skipped {reason}", file=sys.stderr)

    def flush():
        if not pending:
            return
        images = np.stack([img for _, img in pending])
        probs = run(images, scales, flip)
        if crf:
            from deeplab_keras import crf as crf_module
            probs = np.asarray(crf_module.dense_crf(probs, images, **(crf_params or {})))
        for (path, image), p in zip(pending, probs):
            stem = os.path.splitext(os.path.basename(path))[0]
            labels = p.argmax(-1).astype(np.uint8)
            names = class_names or (VOC_CLASSES if p.shape[-1] == 21 else [f"class_{i}" for i in range(p.shape[-1])])
            target = os.path.join(out_dir, stem + ".png")
            try:
                atomic_write_bytes(target, label_png_bytes(labels), overwrite)
                if overlay_images:
                    target = os.path.join(out_dir, stem + "_overlay.png")
                    atomic_write_bytes(target, png_bytes(overlay(image, labels)), overwrite)
            except FileExistsError as err:
                skip(path, err, f"{path}: {err}")
                continue
            except OSError as err:  # a full disk, a read-only folder: stop (the next image would fail as well)
                raise RuntimeError(f"cannot write {target}: {err.strerror or err}; free some space or choose "
                                   "another --out") from err
            counts = np.bincount(labels.reshape(-1), minlength=p.shape[-1])
            areas[stem] = {names[i]: round(float(c) / labels.size, 6) for i, c in enumerate(counts) if c}
            written.append(stem)
        pending.clear()

    try:
        for path in tqdm(paths, desc="predict", unit="img", disable=not progress):
            try:
                image = read_image(path, max_pixels)
            except BadDataError as err:
                skip(path, err, str(err))
                continue
            if pending and (pending[0][1].shape != image.shape or len(pending) >= batch_size):
                flush()
            pending.append((path, image))
        flush()
    except BaseException:
        if areas:  # keep the areas of the masks already written; the original error is what gets reported
            with contextlib.suppress(Exception):
                merge_areas(out_dir, areas)
        raise
    if areas:
        merge_areas(out_dir, areas)
    return {"written": written, "failed": failed, "areas": areas}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="deeplab-predict", description="Segment images with a DeepLab checkpoint or exported SavedModel; "
        "writes VOC-palette index PNGs, optional overlays and per-image class areas (areas.json / areas.csv).")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a .keras file or a deeplab-train run directory")
    source.add_argument("--saved-model", help="a SavedModel from deeplab-export (OUT/ or OUT/<version>/)")
    source.add_argument("--preset", metavar="NAME", help="a released DeepLab v2 model (downloaded and converted once "
                        "into the Keras cache), e.g. deeplabv2_resnet101_msc_voc")
    parser.add_argument("--preset-sha256", metavar="HEX", help="the sha256 you trust for the preset's download")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--crf", action="store_true", help="refine with the dense CRF (custom op)")
    parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test scales, e.g. 0.75 1 1.25")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first bad image")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse larger images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary; failures only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and TensorFlow's start-up logs")
    return parser


def main(argv=None):
    """``deeplab-predict``: exit 0 when every image was written, 1 when some failed or the run stopped (a full
    disk, Ctrl-C: 130), 2 on bad arguments; expected failures are one line, tracebacks only with ``--debug``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_tensorflow(args.debug)
    return run_command("deeplab-predict", lambda: _run(parser, args), debug=args.debug,
                       interrupted="interrupted; the masks written so far are complete and their areas recorded")


def _first_line(err):
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _run(parser, args):
    if args.batch_size < 1:
        usage_error(parser, f"--batch-size must be >= 1, got {args.batch_size}")
    if any(s <= 0 for s in args.scales):
        usage_error(parser, f"--scales must be > 0, got {args.scales}")
    if args.max_pixels < 1:
        usage_error(parser, f"--max-pixels must be >= 1, got {args.max_pixels}")
    for item in args.inputs:
        if not os.path.exists(item):
            usage_error(parser, f"input {item!r} does not exist")
    paths = collect_inputs(args.inputs)
    if not paths:
        usage_error(parser, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {' '.join(args.inputs)}")
    try:
        output_names(paths, args.out, args.overlay)
        read_areas(args.out)
    except ValueError as err:
        usage_error(parser, str(err))
    try:
        if args.checkpoint:
            from deeplab_keras.models import load_model
            model = load_model(args.checkpoint)
        elif args.preset:
            from deeplab_keras.models.presets import from_preset
            model = from_preset(args.preset, sha256=args.preset_sha256)
        else:
            if not os.path.isdir(args.saved_model):
                usage_error(parser, f"--saved-model {args.saved_model!r} is not a directory")
            predictor = SavedModelPredictor(args.saved_model)
            model = predictor
    except (FileNotFoundError, ValueError, OSError) as err:
        usage_error(parser, str(err).splitlines()[0])
    except RuntimeError as err:  # a preset's download failed or does not match its sha256
        print(f"deeplab-predict: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001  (e.g. a corrupt .keras: Keras raises many kinds)
        if args.debug:
            raise
        usage_error(parser, f"cannot load the model: {_first_line(err)} ({type(err).__name__})")
    summary = predict_files(model, paths, args.out, crf=args.crf, overlay_images=args.overlay,
                            scales=tuple(args.scales), flip=args.flip, batch_size=args.batch_size,
                            overwrite=args.overwrite, stop_on_error=args.stop_on_error, max_pixels=args.max_pixels,
                            progress=not args.quiet)
    if not args.quiet:  # the failures were reported on stderr as they happened ("skipped ...")
        print(f"wrote {len(summary['written'])} masks to {args.out}; {len(summary['failed'])} failed")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
