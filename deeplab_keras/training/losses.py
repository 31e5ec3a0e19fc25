"""The loss and metric of the recipe: :func:`segmentation_loss` (ignores 255, VALID normalisation, optional
per-class weights) and :class:`SegmentationMeanIoU`, both resizing logits and labels as the config says; the class
weights of ``optimizer.class_weights`` (:func:`count_class_pixels`, :func:`class_weights_from`).

Class weights weight each pixel's cross-entropy by the weight of its label; the loss is then normalised by the
sum of the weights of the non-ignored pixels (the weighted mean, as PyTorch's ``CrossEntropyLoss(weight=...)``),
so uniform weights give the unweighted loss whatever their scale.
"""
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from deeplab_keras import inference

# The logits resize of the loss and the metric: ``deeplab_keras.inference.upsample_logits`` (corner-aligned
# bilinear in float32, logit i on pixel OS * i as Caffe's Interp), the same one evaluation, prediction and the
# exported graphs use. ``resize_logits`` is kept as the name this module has always exported.
resize_logits = inference.upsample_logits


def _resize_labels(labels, size):
    """Nearest-neighbour (corner-aligned) resize of labels [N,H,W] to ``size``."""
    labels = tf.expand_dims(labels, -1)
    resized = tf.raw_ops.ResizeNearestNeighbor(images=labels, size=tf.cast(size, tf.int32), align_corners=True,
                                               half_pixel_centers=False)
    return tf.squeeze(resized, -1)


def segmentation_loss(labels, logits, ignore_label=255, upsample_logits=True, class_weights=None):
    """Summed sparse softmax cross-entropy over non-ignored pixels, and their count (their summed class weights).

    Args:
        labels: [N,H,W] integer labels; ``ignore_label`` pixels do not count.
        logits: [N,h,w,C] logits (any float dtype; computed in float32).
        ignore_label: label value to ignore.
        upsample_logits: resize logits to the label size (True) or labels to the logit size (False).
        class_weights: None, or C float weights: pixel ``i`` counts ``class_weights[labels[i]]`` times.

    Returns:
        (loss_sum, valid_count): float32 scalars; the mean loss is ``loss_sum / valid_count``. With class weights
        ``loss_sum`` is the weighted sum and ``valid_count`` the sum of the valid pixels' weights.

    Example:
        >>> labels, logits = tf.constant([[[0, 1, 255]]]), tf.zeros([1, 1, 3, 2])
        >>> [round(float(v), 4) for v in segmentation_loss(labels, logits, class_weights=[1.0, 3.0])]
        [2.7726, 4.0]
    """
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 4:
        labels = tf.squeeze(labels, -1)
    if upsample_logits:
        logits = resize_logits(logits, tf.shape(labels)[1:3])
    else:
        logits = tf.cast(logits, tf.float32)
        labels = _resize_labels(labels, tf.shape(logits)[1:3])
    weights, safe_labels = pixel_weights(labels, ignore_label, class_weights)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    ce = tf.where(weights > 0, ce * weights, tf.zeros_like(ce))
    return tf.reduce_sum(ce), tf.reduce_sum(weights)


def pixel_weights(labels, ignore_label=255, class_weights=None):
    """(weights, safe labels) of integer ``labels`` [N,H,W]: float32 weight per pixel (0 for ``ignore_label``,
    else 1 or ``class_weights[label]``) and the labels with ignored pixels set to 0 (valid class indices)."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    weights = tf.cast(valid, tf.float32)
    if class_weights is not None:
        weights *= tf.gather(tf.cast(class_weights, tf.float32), safe_labels)
    return weights, safe_labels


FREQUENCIES_FILE = "class_frequencies.json"


def count_class_pixels(dataset, num_classes, ignore_label=255, progress=True):
    """Pixel counts per class over a dataset's labels (one pass, with a tqdm bar on stderr).

    Args:
        dataset: iterable of {"label": [H, W]} dicts (e.g. the un-augmented training ``tf.data.Dataset``).
        num_classes: C.
        ignore_label: label value not counted.
        progress: show the progress bar.

    Returns:
        dict: ``num_classes``, ``ignore_label``, ``images``, ``pixels`` (C pixel counts) and ``image_pixels`` (C
        counts of all the pixels of the images where the class appears: median-frequency balancing's denominator).

    Raises:
        ValueError: a label value outside 0..C-1 that is not ``ignore_label`` (naming the file when known).
    """
    from tqdm import tqdm

    pixels, image_pixels, images = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64), 0
    for example in tqdm(dataset, desc="class frequencies", unit="img", file=sys.stderr, disable=not progress):
        label = np.asarray(example["label"]).reshape(-1)
        counts = np.bincount(label, minlength=256)
        counts[ignore_label] = 0
        if counts[num_classes:].any():
            name = example.get("file_name", None)
            name = name.numpy().decode() if hasattr(name, "numpy") else name
            raise ValueError(f"{name or 'a training label'} holds label values "
                             f"{np.flatnonzero(counts[num_classes:]) + num_classes} outside 0..{num_classes - 1} "
                             f"(and not the ignore label {ignore_label}); check model.num_classes")
        counts = counts[:num_classes]
        pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)
        images += 1
    return {"num_classes": int(num_classes), "ignore_label": int(ignore_label), "images": images,
            "pixels": pixels.tolist(), "image_pixels": image_pixels.tolist()}


def class_frequencies(run_dir, dataset, num_classes, ignore_label=255, progress=True, write=True):
    """The run's class counts: read from ``run_dir/class_frequencies.json`` when it holds these classes, else
    counted (:func:`count_class_pixels`) and, with ``write``, written there atomically (so a resumed run does not
    count again).

    Example:
        >>> counts = class_frequencies("runs/x", train_dataset, 21)   # doctest: +SKIP
        >>> weights = class_weights_from("median_frequency", counts)  # doctest: +SKIP
    """
    from deeplab_keras.files import atomic_write_json

    path = os.path.join(run_dir, FREQUENCIES_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved.get("num_classes") == num_classes and saved.get("ignore_label") == ignore_label \
                and len(saved.get("pixels", ())) == num_classes and len(saved.get("image_pixels", ())) == num_classes:
            return saved
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable: count again
    counts = count_class_pixels(dataset, num_classes, ignore_label, progress)
    if write:
        atomic_write_json(path, counts)
    return counts


def class_weights_from(weighting, counts=None, num_classes=None):
    """The C loss weights of ``optimizer.class_weights``.

    Args:
        weighting: None / "none"; "inverse_frequency": ``w_c = 1 / (K * f_c)`` with ``f_c`` the fraction of the
            labelled pixels in class c and K the number of classes present (balanced classes weigh 1);
            "median_frequency" (Eigen & Fergus 2015): ``w_c = median(freq) / freq_c`` with ``freq_c`` the pixels of c
            over all the pixels of the images where c appears; or a list of C weights. Classes absent from the
            training set weigh 0 (they have no pixels to weigh).
        counts: :func:`count_class_pixels`'s dict (for the two frequency weightings).
        num_classes: C, to check a list's length.

    Returns:
        None (no weighting) or a float32 numpy array [C].

    Raises:
        ValueError: a list whose length is not ``num_classes``, or no labelled pixel at all.

    Example:
        >>> class_weights_from("inverse_frequency", {"pixels": [30, 10, 0], "image_pixels": [40, 40, 0]}).tolist()
        [0.6666666865348816, 2.0, 0.0]
    """
    if weighting is None or weighting == "none":
        return None
    if not isinstance(weighting, str):
        weights = np.asarray(weighting, np.float32)
        if num_classes is not None and weights.shape != (num_classes,):
            raise ValueError(f"optimizer.class_weights lists {weights.size} weights but model.num_classes is "
                             f"{num_classes}: give one weight per class")
        return weights
    pixels = np.asarray(counts["pixels"], np.float64)
    present = pixels > 0
    if not present.any():
        raise ValueError(f"optimizer.class_weights={weighting}: the training labels hold no labelled pixel")
    if weighting == "inverse_frequency":
        freq = pixels / pixels.sum()
        scale = present.sum()
    elif weighting == "median_frequency":
        freq = pixels / np.maximum(np.asarray(counts["image_pixels"], np.float64), 1)
        scale = 1.0 / np.median(freq[present])
    else:
        raise ValueError(f"optimizer.class_weights={weighting!r} is not none, inverse_frequency, median_frequency "
                         "or a list of weights")
    return np.where(present, 1.0 / (scale * np.maximum(freq, 1e-300)), 0.0).astype(np.float32)


class SegmentationMeanIoU(keras.metrics.MeanIoU):
    """``keras.metrics.MeanIoU`` over logits at any resolution: resizes them to the labels, ignores 255.

    Args:
        num_classes: number of classes.
        ignore_label: label value that does not count.
        name: metric name.
    """

    def __init__(self, num_classes, ignore_label=255, name="miou", **kwargs):
        kwargs.pop("ignore_class", None)
        kwargs.pop("sparse_y_pred", None)
        super().__init__(num_classes=num_classes, name=name, ignore_class=ignore_label, sparse_y_pred=False,
                         **kwargs)
        self.ignore_label = ignore_label

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.convert_to_tensor(y_true)
        if y_true.shape.rank == 4:
            y_true = tf.squeeze(y_true, -1)
        y_pred = resize_logits(y_pred, tf.shape(y_true)[1:3])
        return super().update_state(tf.cast(y_true, tf.int32), y_pred, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.pop("ignore_class", None)
        config.pop("sparse_y_pred", None)
        config["ignore_label"] = self.ignore_label
        return config
