"""Segment image files: VOC-palette index PNGs, overlays and per-image class areas (``deeplab-predict``).

Example:
    >>> import deeplab_keras as dk
    >>> from deeplab_keras.predict import predict_files
    >>> model = dk.DeepLabV2(num_classes=21, backbone="resnet50")
    >>> summary = predict_files(model, ["photo.jpg"], "masks/", overlay_images=True)   # doctest: +SKIP
"""
import argparse
import csv
import io
import json
import os
import sys

import numpy as np
from PIL import Image

from deeplab_keras.utils import VOC_CLASSES, atomic_write_bytes, voc_palette

MAX_PIXELS = 50_000_000  # larger images are refused (decompression bombs); --max-pixels changes it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An input file that cannot be used as an image; the message names the file."""


def read_image(path, max_pixels=MAX_PIXELS):
    """Read an image file as uint8 RGB [H, W, 3].

    Raises:
        ImageError: empty file, not an image, truncated data, or more than ``max_pixels`` pixels.
    """
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{path}: {width}x{height} = {width * height} pixels is over the limit of "
                                 f"{max_pixels} (raise it with --max-pixels if the image is genuine)")
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: refused as a decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from None


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
    """Expand files and directories (their image files, sorted) into a list of paths."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, n) for n in os.listdir(item) if n.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} does not exist")
    return paths


class SavedModelPredictor:
    """Probabilities from an exported SavedModel (``serving_default``: uint8 image -> probabilities)."""

    def __init__(self, directory):
        import tensorflow as tf
        versions = [d for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
        if not os.path.exists(os.path.join(directory, "saved_model.pb")) and versions:
            directory = os.path.join(directory, max(versions, key=int))
        self.fn = tf.saved_model.load(directory).signatures["serving_default"]

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
        dict with ``written`` (stems), ``failed`` ({path: reason}) and ``areas``.
    """
    from tqdm import tqdm

    from deeplab_keras.inference import Predictor
    os.makedirs(out_dir, exist_ok=True)
    if callable(model) and not hasattr(model, "layers"):
        run = model
    else:
        predictor = Predictor(model, scales, flip)  # one traced function for every image size and batch

        def run(images, scales, flip):
            return predictor(images).numpy()
    written, failed, areas = [], {}, {}
    pending = []

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
            try:
                atomic_write_bytes(os.path.join(out_dir, stem + ".png"), label_png_bytes(labels), overwrite)
                if overlay_images:
                    atomic_write_bytes(os.path.join(out_dir, stem + "_overlay.png"), png_bytes(overlay(image, labels)),
                                       overwrite)
            except FileExistsError as err:
                if stop_on_error:
                    raise
                failed[path] = str(err)
                continue
            counts = np.bincount(labels.reshape(-1), minlength=p.shape[-1])
            areas[stem] = {names[i]: round(float(c) / labels.size, 6) for i, c in enumerate(counts) if c}
            written.append(stem)
        pending.clear()

    for path in tqdm(paths, desc="predict", unit="img", disable=not progress):
        try:
            image = read_image(path, max_pixels)
        except ImageError as err:
            if stop_on_error:
                raise
            failed[path] = str(err)
            print(f"skipped {err}", file=sys.stderr)
            continue
        if pending and (pending[0][1].shape != image.shape or len(pending) >= batch_size):
            flush()
        pending.append((path, image))
    flush()
    if written:
        atomic_write_bytes(os.path.join(out_dir, "areas.json"), json.dumps(areas, indent=1).encode(), overwrite=True)
        buf = io.StringIO()
        names = sorted({n for a in areas.values() for n in a})
        writer = csv.writer(buf)
        writer.writerow(["image"] + names)
        for stem, a in areas.items():
            writer.writerow([stem] + [a.get(n, 0.0) for n in names])
        atomic_write_bytes(os.path.join(out_dir, "areas.csv"), buf.getvalue().encode(), overwrite=True)
    return {"written": written, "failed": failed, "areas": areas}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="deeplab-predict", description="Segment images with a DeepLab checkpoint or exported SavedModel; "
        "writes VOC-palette index PNGs, optional overlays and per-image class areas (areas.json / areas.csv).")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a .keras file or a deeplab-train run directory")
    source.add_argument("--saved-model", help="a SavedModel from deeplab-export (OUT/ or OUT/<version>/)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--crf", action="store_true", help="refine with the dense CRF (custom op)")
    parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test scales, e.g. 0.75 1 1.25")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first bad image")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse larger images")
    return parser


def main(argv=None):
    """``deeplab-predict``: exit 0 when every image was written, 1 when some failed, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if any(s <= 0 for s in args.scales):
        parser.error(f"--scales must be > 0, got {args.scales}")
    for item in args.inputs:
        if not os.path.exists(item):
            parser.error(f"input {item!r} does not exist")
    try:
        if args.checkpoint:
            from deeplab_keras.models import load_model
            model = load_model(args.checkpoint)
        else:
            if not os.path.isdir(args.saved_model):
                parser.error(f"--saved-model {args.saved_model!r} is not a directory")
            predictor = SavedModelPredictor(args.saved_model)
            model = predictor
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.error(str(err).splitlines()[0])
    summary = predict_files(model, collect_inputs(args.inputs), args.out, crf=args.crf, overlay_images=args.overlay,
                            scales=tuple(args.scales), flip=args.flip, batch_size=args.batch_size,
                            overwrite=args.overwrite, stop_on_error=args.stop_on_error, max_pixels=args.max_pixels)
    print(f"wrote {len(summary['written'])} masks to {args.out}; {len(summary['failed'])} failed"
          + "".join(f"\n  failed: {reason}" for reason in summary["failed"].values()))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
