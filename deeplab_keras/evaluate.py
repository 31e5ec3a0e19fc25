"""Evaluation: confusion-matrix mIoU (ignoring 255), per-class IoU, pixel accuracy, with and without the CRF.

Predictions are made at full image resolution by ``deeplab_keras.inference`` (the same code as
``deeplab-predict``): the logits of each image (optionally at several input scales and horizontally flipped) are
upsampled to the image size with ``inference.upsample_logits`` (corner-aligned bilinear, the geometry of an
output-stride-8 network, the same resize the training loss and the exported graphs use), turned into softmax
probabilities and averaged over scales / flips. ``predict_probabilities`` here is
``deeplab_keras.inference.predict_probabilities``. With ``crf=True`` the same probabilities also go through
``deeplab_keras.crf.dense_crf`` and both results are reported from the one pass over the data.

The mIoU is the mean over classes of ``TP / (TP + FP + FN)`` from a confusion matrix accumulated over the
whole dataset (not a mean of per-image scores), skipping classes that appear neither in the ground truth nor
in the predictions, exactly as ``keras.metrics.MeanIoU(ignore_class=255)``.

The paper's test protocol (``pad_to=513``, ``deeplab-eval --protocol deeplab-v2``): each image is padded at the
bottom and right to 513x513 with the model's mean colour (DeepLab v2's (R, G, B) = (122.675, 116.669, 104.008) as
float input, i.e. zeros after the model's mean subtraction, as Caffe's padding of the mean-subtracted image),
the logits of the padded image are upsampled (corner-aligned) to 513x513 and cropped back to the image, which is
the same as padding the labels with 255. A model with ``msc_scales`` fuses its scales itself. The CRF then runs
on the cropped probabilities and the original image with ``CRFParams()`` (the paper's values).

Example:
    >>> from deeplab_keras.evaluate import evaluate, format_table
    >>> results = evaluate("runs/tiny", dataset, crf=True)          # doctest: +SKIP
    >>> results = evaluate(model, dataset, pad_to=513, crf=True)     # doctest: +SKIP
    >>> print(format_table(results))                                 # doctest: +SKIP
"""
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

from deeplab_keras.crf import CRFParams, dense_crf  # noqa: E402
from deeplab_keras.data import BadDataError  # noqa: E402
from deeplab_keras.data.reader import tf_error_line  # noqa: E402
from deeplab_keras.inference import Predictor, predict_probabilities  # noqa: E402,F401  (re-exported)
from deeplab_keras.layers.preprocessing import DEEPLAB_MEAN_RGB  # noqa: E402
from deeplab_keras.precision import check_precision  # noqa: E402
from deeplab_keras.files import atomic_write_json  # noqa: E402

__all__ = ["confusion_matrix", "scores", "predict_probabilities", "evaluate", "format_table", "write_json",
           "pad_image", "padded_probabilities", "model_mean_rgb", "data_error", "PAPER_PAD_SIZE"]

PAPER_PAD_SIZE = 513  # DeepLab v2's test input: every VOC image (at most 500 px a side) padded to 513x513


def confusion_matrix(labels, predictions, num_classes, ignore_label=255):
    """Confusion matrix [num_classes, num_classes] (rows: ground truth, columns: prediction), int64.

    Args:
        labels: integer array of any shape; ``ignore_label`` pixels are skipped.
        predictions: integer array of the same shape.
        num_classes: number of classes.
        ignore_label: label value to skip.

    Raises:
        ValueError: shapes differ, or a label / prediction outside 0..num_classes-1 (other than ignore_label).
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    predictions = np.asarray(predictions).astype(np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"labels ({np.asarray(labels).shape}) and predictions ({np.asarray(predictions).shape}) "
                         "must have the same shape")
    keep = labels != ignore_label
    labels, predictions = labels[keep], predictions[keep]
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = np.unique(values[(values < 0) | (values >= num_classes)])[:10]
            raise ValueError(f"{name} hold values {bad.tolist()} outside 0..{num_classes - 1} "
                             f"(and not the ignore label {ignore_label}); check num_classes")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def scores(cm, class_names=None):
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy of a confusion matrix.

    Classes absent from both ground truth and predictions have IoU None and do not count in the mean.

    Returns:
        dict with "miou", "pixel_accuracy", "mean_accuracy", "per_class_iou" {name: iou|None}, "pixels".
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"class_names has {len(names)} names for {n} classes")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    acc = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
    total = cm.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "mean_accuracy": float(np.nanmean(acc)) if np.any(gt > 0) else 0.0,
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
        "pixels": int(total),
    }


def model_mean_rgb(model):
    """The (R, G, B) colour that ``model``'s preprocessing maps to zero (its ``preprocess`` layer's mean), else
    DeepLab v2's mean."""
    for owner in (getattr(model, "network", None), model):
        try:
            return tuple(float(m) for m in owner.get_layer("preprocess").mean_bgr[::-1])
        except (AttributeError, ValueError):
            continue
    return tuple(DEEPLAB_MEAN_RGB)


def pad_image(image, size, mean_rgb=DEEPLAB_MEAN_RGB):
    """``image`` [H, W, 3] in the top-left corner of a float32 [size, size, 3] canvas of the mean colour.

    Raises:
        ValueError: the image is larger than ``size`` on a side.

    Example:
        >>> pad_image(np.zeros((2, 3, 3), np.uint8), 4)[3, 3].tolist()
        [122.67500305175781, 116.66899871826172, 104.00800323486328]
    """
    height, width = image.shape[:2]
    if height > size or width > size:
        raise ValueError(f"a {height}x{width} image does not fit the {size}x{size} padding; raise --pad-to "
                         f"(pad_to) to at least {max(height, width)} or leave it out")
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = np.asarray(mean_rgb, np.float32)
    canvas[:height, :width] = image
    return canvas


def padded_probabilities(predictor, image, size, mean_rgb=DEEPLAB_MEAN_RGB):
    """The paper's test input: probabilities [1, H, W, C] of ``image`` [H, W, 3] padded to ``size`` (see
    :func:`pad_image`), computed at the padded size and cropped back.

    Args:
        predictor: a :class:`deeplab_keras.inference.Predictor`.
        image: [H, W, 3] RGB 0..255.
        size: the padded side (513 in the paper).
        mean_rgb: the padding colour (:func:`model_mean_rgb` of the model).
    """
    height, width = image.shape[:2]
    return predictor.numpy(pad_image(image, size, mean_rgb)[None])[:, :height, :width]


def _examples(dataset):
    """Yields (image [H,W,3], label [H,W], name) numpy triples from dicts, tuples, batched or not; unnamed
    examples are called image_<index in the dataset>."""
    index = 0
    for element in _unwrapped(dataset):
        if isinstance(element, dict):
            image, label = element["image"], element["label"]
            name = element.get("file_name", None)
        elif isinstance(element, (tuple, list)) and len(element) in (2, 3):
            image, label = element[0], element[1]
            name = element[2] if len(element) == 3 else None
        else:
            raise ValueError("dataset elements must be dicts {'image', 'label'} or (image, label) tuples, got "
                             f"{type(element).__name__}")
        image, label = np.asarray(image), np.asarray(label)
        names = None if name is None else np.asarray(name)
        if image.ndim == 3:
            image, label = image[None], label[None]
            names = None if names is None else names[None]
        if label.ndim == 4:
            label = label[..., 0]
        if image.ndim != 4 or image.shape[-1] != 3 or label.shape != image.shape[:3]:
            raise ValueError(f"image {image.shape} and label {label.shape} do not match: expected [H,W,3] and "
                             "[H,W] (or batched)")
        for i in range(image.shape[0]):
            n = None if names is None else names[i]
            yield image[i], label[i], (n.decode() if isinstance(n, bytes) else (str(n) if n is not None else
                                                                                f"image_{index}"))
            index += 1


def _unwrapped(dataset):
    """Iterates ``dataset``; an error raised by a tf.data function (a bad file in ``folder_dataset``) comes out as
    the :class:`BadDataError` it carries, without TensorFlow's traceback."""
    import tensorflow as tf

    iterator = iter(dataset)
    while True:
        try:
            element = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as err:
            raise data_error(err) from None
        yield element


def data_error(err):
    """The one-line :class:`BadDataError` inside a TensorFlow error from a data pipeline (else its first line)."""
    return BadDataError(tf_error_line(err))


def _load(model):
    if isinstance(model, (str, os.PathLike)):
        from deeplab_keras.weights import load_model

        return load_model(model)
    return model


def evaluate(model, dataset, num_classes=None, *, scales=(1.0,), flip=False, crf=False, crf_params=None,
             pad_to=None, class_names=None, ignore_label=255, max_images=None, progress=True, tile_size=None,
             tile_overlap=None, precision=None):
    """Evaluates a model at full resolution; with ``crf=True`` reports both the plain and the CRF results.

    Args:
        model: a Keras DeepLab model, or a path (`.keras` file or run directory) for ``models.load_model``.
        dataset: iterable of {"image" uint8 [H,W,3], "label" uint8 [H,W]} (``load_voc``, ``folder_dataset``,
            ``make_synthetic``) or (image, label) pairs, batched or not; image RGB 0..255 at full size.
        num_classes: default: the model's output channels.
        scales: test scales (probabilities averaged), e.g. (0.5, 0.75, 1.0, 1.25, 1.5).
        flip: also average horizontally flipped predictions.
        crf: also run the dense CRF on the averaged probabilities.
        crf_params: a :class:`deeplab_keras.crf.CRFParams`, a dict of some of its fields, or None (the paper's
            values, ``CRFParams()``).
        pad_to: the paper's protocol: pad each image bottom/right to ``pad_to`` x ``pad_to`` with the model's mean
            colour, predict, crop back (see :func:`padded_probabilities`); None predicts at the image size.
        class_names: names for the per-class table (default "0".."C-1").
        ignore_label: ground-truth value that does not count.
        max_images: stop after this many images.
        progress: show a progress bar on stderr.
        tile_size, tile_overlap: predict overlapping tiles of this size (an int or (h, w)), overlapping by
            ``tile_overlap`` (None: ``inference.DEFAULT_TILE_OVERLAP``), and blend them
            (``deeplab_keras.inference.tiled_probabilities``); the CRF runs on the stitched probabilities.
        precision: "float32" (None) or "bf16" (a bfloat16 copy of the model, on CPUs with native bfloat16:
            ``deeplab_keras.precision``); recorded in the result.

    Returns:
        dict: {"no_crf": scores, "crf": scores (when crf), "images", "scales", "flip", "pad_to", "crf_params",
        "seconds"} where scores is :func:`scores`'s dict.

    Raises:
        ValueError: an image larger than ``pad_to``; labels or predictions outside the classes; bad ``crf_params``
            (before any image is read).
        BadDataError: (a ValueError) a bad data file, named (e.g. a label value out of range in folder data).
    """
    model = _load(model)
    predictor = Predictor(model, scales, flip, tile_size, tile_overlap, precision=precision)
    if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1):
        raise ValueError(f"pad_to={pad_to!r} must be a positive int (513 in the paper) or None")
    mean_rgb = model_mean_rgb(model)
    params = CRFParams.resolve(crf_params)
    cms, count, start = {}, 0, time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_images, unit="img", desc="eval", file=sys.stderr)
    for image, label, name in _examples(dataset):
        if max_images is not None and count >= max_images:
            break
        if pad_to is None:
            probs = predictor.numpy(image[None])
        else:
            try:
                probs = padded_probabilities(predictor, image, pad_to, mean_rgb)
            except ValueError as err:
                raise ValueError(f"image {name}: {err}") from None
        if num_classes is None:
            num_classes = int(probs.shape[-1])
        elif int(probs.shape[-1]) != num_classes:
            raise ValueError(f"the model predicts {int(probs.shape[-1])} classes but num_classes={num_classes}")
        outputs = {"no_crf": probs}
        if crf:
            rgb = np.clip(np.round(image.astype(np.float32)), 0, 255).astype(np.uint8)[None]
            outputs["crf"] = dense_crf(probs, rgb, params)
        for key, p in outputs.items():
            pred = np.argmax(np.asarray(p)[0], axis=-1)
            cm = confusion_matrix(label, pred, num_classes, ignore_label)
            cms[key] = cm if key not in cms else cms[key] + cm
        count += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if count == 0:
        raise ValueError("the evaluation dataset is empty")
    result = {key: scores(cm, class_names) for key, cm in cms.items()}
    result.update(images=count, scales=list(predictor.scales), flip=bool(flip), pad_to=pad_to,
                  precision=check_precision(precision),
                  crf_params=params.to_dict() if crf else None, seconds=round(time.time() - start, 2),
                  tile_size=list(predictor.tile_size) if predictor.tile_size else None,
                  tile_overlap=predictor.tile_overlap if predictor.tile_size else None)
    for key, cm in cms.items():
        result[key]["confusion_matrix"] = cm.tolist()
    return result


def format_table(results):
    """A text table: per-class IoU (without / with CRF), then mIoU, pixel accuracy and mean accuracy."""
    keys = [k for k in ("no_crf", "crf") if k in results]
    headers = {"no_crf": "IoU" if len(keys) == 1 else "IoU (no CRF)", "crf": "IoU (CRF)"}
    names = list(results[keys[0]]["per_class_iou"])
    width = max([len(n) for n in names] + [len("pixel accuracy")])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{headers[k]:>12}" for k in keys)]
    lines.append("-" * len(lines[0]))

    def fmt(v):
        return f"{100 * v:11.2f}%" if v is not None else f"{'n/a':>12}"

    for name in names:
        lines.append(f"{name:<{width}}  " + "  ".join(fmt(results[k]["per_class_iou"][name]) for k in keys))
    lines.append("-" * len(lines[0]))
    for label, field in (("mIoU", "miou"), ("pixel accuracy", "pixel_accuracy"), ("mean accuracy", "mean_accuracy")):
        lines.append(f"{label:<{width}}  " + "  ".join(fmt(results[k][field]) for k in keys))
    padding = f", padded to {results['pad_to']}" if results.get("pad_to") else ""
    if results.get("tile_size"):
        padding += f", tiles {'x'.join(map(str, results['tile_size']))} overlapping {results['tile_overlap']:g}"
    lines.append(f"{results['images']} images, scales {results['scales']}, flip {results['flip']}{padding}, "
                 f"{results['seconds']} s")
    return "\n".join(lines)


def write_json(results, path):
    """Writes ``results`` as JSON atomically (temporary file + rename)."""
    return atomic_write_json(os.path.abspath(os.fspath(path)), results)
