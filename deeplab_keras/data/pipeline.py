"""The tf.data pipeline: dataset of examples -> batches of (image float32 RGB 0..255, label uint8).

Training (the DeepLab v2 recipe): random scale in ``scale_range`` (image bilinear, label nearest, so no label
is ever interpolated), pad to ``crop_size`` with the mean colour / the ignore label, random crop, random
horizontal flip. Evaluation: no augmentation; full size (batch 1) or padded to ``crop_size``. Randomness uses
stateless ops seeded per element from ``tf.data.Dataset.random``, so a seeded pipeline gives the same batches
on every run (and different crops in each epoch), whatever the parallelism.

Example:
    >>> from deeplab_keras.data import make_pipeline, make_synthetic
    >>> train = make_pipeline(make_synthetic(16, size=(97, 97)), training=True, batch_size=4,
    ...                       crop_size=(65, 65), num_classes=4, seed=0)
    >>> images, labels = next(iter(train))       # float32 [4, 65, 65, 3], uint8 [4, 65, 65]
"""
import inspect

import tensorflow as tf

from deeplab_keras.data.reader import IGNORE_LABEL, SkipCounter
from deeplab_keras.layers.preprocessing import DEEPLAB_MEAN_RGB as MEAN_RGB  # crops are padded with it


def _pair(value, name):
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{name}={value!r}: expected (height, width) with positive ints, or None")
    return value


def _as_example(element):
    """Accepts dicts {"image", "label"[, "file_name"]} or (image, label) tuples; returns the dict form."""
    if isinstance(element, dict):
        missing = {"image", "label"} - set(element)
        if missing:
            raise ValueError(f"dataset elements lack {sorted(missing)}; expected dicts with 'image' uint8 "
                             "[H, W, 3], 'label' uint8 [H, W] and optionally 'file_name'")
        name = element.get("file_name", tf.constant(""))
        return element["image"], element["label"], name
    if isinstance(element, (tuple, list)) and len(element) in (2, 3):
        name = element[2] if len(element) == 3 else tf.constant("")
        return element[0], element[1], name
    raise ValueError(f"dataset elements must be dicts with 'image'/'label' or (image, label) tuples, got "
                     f"{element!r}")


def _label_2d(label):
    if label.shape.rank == 3:  # [H, W, 1]
        label = tf.squeeze(label, -1)
    if label.shape.rank != 2:
        raise ValueError(f"label must be [H, W] (or [H, W, 1]); got shape {label.shape}")
    return label


def _validity(image, label, num_classes, ignore_label):
    """Scalar bools: sizes agree; values within {0..C-1, 255, ignore_label}; plus the offending values."""
    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(label)))
    if num_classes is None:
        return same_size, tf.constant(True), tf.zeros([0], tf.uint8)
    in_range = (label < num_classes) | (label == IGNORE_LABEL) | (label == ignore_label)
    values_ok = tf.reduce_all(in_range)
    bad_values = tf.cond(values_ok, lambda: tf.zeros([0], tf.uint8),
                         lambda: tf.unique(tf.boolean_mask(tf.reshape(label, [-1]),
                                                           tf.reshape(~in_range, [-1])))[0][:10])
    return same_size, values_ok, bad_values


def _pad_to(image, label, height, width, mean, ignore_label):
    """Pads bottom/right to at least (height, width): image with the mean colour, label with ignore_label."""
    shape = tf.shape(label)
    pad_h, pad_w = tf.maximum(height - shape[0], 0), tf.maximum(width - shape[1], 0)
    image = tf.pad(image - mean, [[0, pad_h], [0, pad_w], [0, 0]]) + mean
    label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=ignore_label)
    return image, label


def _nearest(out_index, in_size, out_size):
    """Source index of tf.image.resize's nearest neighbour (half-pixel centres), clamped to the image."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    index = tf.cast(tf.floor((tf.cast(out_index, tf.float32) + 0.5) * scale), tf.int32)
    return tf.clip_by_value(index, 0, in_size - 1)


def _draw(seed, size, crop_size, scale_range, flip):
    """Random augmentation parameters of one element: scaled size, crop offset (in the padded scaled image),
    flip."""
    seeds = [tf.stack([seed, tf.constant(k, tf.int64)]) for k in range(4)]
    if scale_range is not None and tuple(scale_range) != (1.0, 1.0):
        scale = tf.random.stateless_uniform([], seeds[0], minval=scale_range[0], maxval=scale_range[1])
        scaled = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32), 1)
    else:
        scaled = size
    padded = tf.maximum(scaled, tf.constant(crop_size))
    top = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=padded[0] - crop_size[0] + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[2], minval=0, maxval=padded[1] - crop_size[1] + 1, dtype=tf.int32)
    do_flip = tf.random.stateless_uniform([], seeds[3]) < 0.5 if flip else tf.constant(False)
    return scaled, top, left, do_flip


def scale_crop_flip(image, label, scaled, top, left, do_flip, crop_size, mean, ignore_label):
    """Resizes to ``scaled`` (image bilinear, label nearest), pads to the crop size (mean colour / ignore
    label), crops at (top, left) and optionally flips — computing only the crop's pixels.

    Equals tf.image.resize (half-pixel centres, no antialias) of the whole image followed by pad, crop and
    flip, but the crop is sampled directly from the source (ScaleAndTranslate for the image, gathers of the
    nearest rows/columns for the label), so the cost is proportional to the crop, not to the scaled image.

    Args:
        image: [H, W, 3] (any real dtype); label: uint8 [H, W].
        scaled: int32 [2], size after scaling; top, left: int32 crop offset; do_flip: bool.
        crop_size: (height, width); mean: float32 [3]; ignore_label: int.

    Returns:
        (float32 [crop_h, crop_w, 3], uint8 [crop_h, crop_w]).
    """
    size = tf.shape(label)
    rows = top + tf.range(crop_size[0])
    cols = left + tf.range(crop_size[1])
    # Image: ScaleAndTranslate with a triangle kernel and no antialiasing is tf.image.resize's bilinear
    # (half-pixel centres, edge clamped) evaluated only on the crop window.
    scale = tf.cast(scaled, tf.float32) / tf.cast(size, tf.float32)
    translation = -tf.cast(tf.stack([top, left]), tf.float32)
    out_image = tf.raw_ops.ScaleAndTranslate(images=image[None], size=tf.constant(crop_size, tf.int32),
                                             scale=scale, translation=translation, kernel_type="triangle",
                                             antialias=False)[0]
    # Label: nearest source row/column of each crop pixel.
    ny = _nearest(rows, size[0], scaled[0])
    nx = _nearest(cols, size[1], scaled[1])
    out_label = tf.gather(tf.gather(label, ny), nx, axis=1)
    inside = (rows < scaled[0])[:, None] & (cols < scaled[1])[None, :]
    out_image = tf.where(inside[..., None], out_image, tf.cast(mean, tf.float32))
    out_label = tf.where(inside, out_label, tf.constant(ignore_label, tf.uint8))
    out_image = tf.cond(do_flip, lambda: tf.reverse(out_image, [1]), lambda: out_image)
    out_label = tf.cond(do_flip, lambda: tf.reverse(out_label, [1]), lambda: out_label)
    return out_image, out_label


def _augment(image, label, seed, crop_size, scale_range, flip, mean, ignore_label):
    """Random scale, pad, random crop and random flip of one image [H, W, 3] / uint8 label [H, W]."""
    scaled, top, left, do_flip = _draw(seed, tf.shape(label), crop_size, scale_range, flip)
    return scale_crop_flip(image, label, scaled, top, left, do_flip, crop_size, mean, ignore_label)


def make_pipeline(ds, *, training, batch_size, crop_size=(321, 321), scale_range=(0.5, 1.5), flip=True,
                  ignore_label=IGNORE_LABEL, mean_rgb=MEAN_RGB, num_classes=None, shuffle_buffer=256, seed=None,
                  cache=False, drop_remainder=None, skip_bad=False, num_parallel_calls=None, repeat=False,
                  prefetch=True, return_file_name=False):
    """Turns a dataset of examples into augmented (training) or plain (evaluation) batches.

    Args:
        ds: ``tf.data.Dataset`` of dicts ``{"image": uint8 [H, W, 3], "label": uint8 [H, W], "file_name"}``
            (``load_voc``, ``folder_dataset``, ``make_synthetic``) or of ``(image, label)`` tuples.
        training: augment and shuffle (True) or not (False).
        batch_size: examples per batch (per replica under ``distributed_pipeline``).
        crop_size: (height, width) of the training crop / evaluation padding; an int means square. In
            evaluation, None keeps every image at its own size (then batch_size must be 1).
        scale_range: (min, max) of the random scale factor in training; None or (1, 1) = no scaling.
        flip: random horizontal flip in training.
        ignore_label: label of padded pixels (and what 255 in the data becomes); the loss must ignore it.
        mean_rgb: colour of padded image pixels (the ImageNet mean, so padding is zero after preprocessing).
        num_classes: checks that labels are within {0..num_classes-1, 255}; None skips that check.
        shuffle_buffer: examples in the shuffle buffer (training). Decoded images are held there.
        seed: seeds the shuffle and every random op (None = random each run).
        cache: cache the input examples before shuffling: True (memory) or a file path prefix.
        drop_remainder: drop the last incomplete batch; default True in training, False in evaluation.
        skip_bad: skip examples whose label is out of range or of another size than the image (logging each
            one and a count at the end of every pass) instead of raising an error naming the file.
        num_parallel_calls: parallelism of the decode/augment map (default ``tf.data.AUTOTUNE``).
        repeat: repeat the input forever (after the per-pass checks), e.g. for step-based training.
        prefetch: prefetch batches (``tf.data.AUTOTUNE``).
        return_file_name: yield ``(image, label, file_name)`` (for evaluation/prediction; Keras ``fit`` would
            take a third element as sample weights).

    Returns:
        ``tf.data.Dataset`` of ``(image float32 [B, h, w, 3] RGB 0..255, label uint8 [B, h, w])``.
    """
    crop_size, batch_size, scale_range, ignore_label = _checked_arguments(
        training, batch_size, crop_size, scale_range, ignore_label, num_classes)
    parallel = num_parallel_calls or tf.data.AUTOTUNE
    if drop_remainder is None:
        drop_remainder = bool(training)
    counter = SkipCounter("example") if skip_bad else None
    ds = _seeded_examples(ds, training, cache, shuffle_buffer, seed)
    process = _example_processor(training, crop_size, scale_range, flip, ignore_label,
                                 tf.constant(mean_rgb, tf.float32), num_classes, counter, return_file_name)
    ds = ds.map(process, num_parallel_calls=parallel, deterministic=True if seed is not None else None)
    return _batched(ds, counter, repeat, batch_size, drop_remainder, prefetch)


def _checked_arguments(training, batch_size, crop_size, scale_range, ignore_label, num_classes):
    """make_pipeline's argument checks: (crop_size, batch_size, scale_range, ignore_label) normalised."""
    crop_size = _pair(crop_size, "crop_size")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if crop_size is None and batch_size != 1:
        raise ValueError(f"crop_size=None keeps each image's own size, so batch_size must be 1 (got {batch_size}); "
                         "pass crop_size=(513, 513) (pads every VOC image) to batch evaluation images")
    if training and crop_size is None:
        raise ValueError("training needs a crop_size (e.g. (321, 321))")
    if scale_range is not None:
        scale_range = (float(scale_range[0]), float(scale_range[1]))
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range={scale_range}: expected 0 < min <= max")
    if not 0 <= int(ignore_label) <= 255:
        raise ValueError(f"ignore_label={ignore_label}: expected 0..255 (labels are uint8)")
    if num_classes is not None and not 1 <= int(num_classes) <= 255:
        raise ValueError(f"num_classes={num_classes}: expected 1..255")
    return crop_size, batch_size, scale_range, int(ignore_label)


def _seeded_examples(ds, training, cache, shuffle_buffer, seed):
    """Examples as ((image, label, name), element seed): cached, shuffled and seeded in training."""
    ds = ds.map(lambda *element: _as_example(element[0] if len(element) == 1 else element))
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    if training:
        ds = ds.shuffle(int(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
        return tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True))
    return ds.map(lambda *example: (example, tf.constant(0, tf.int64)))


def _example_processor(training, crop_size, scale_range, flip, ignore_label, mean, num_classes, counter,
                       return_file_name):
    """The map function: (example, element seed) -> (output tuple, ok) for one example."""

    def process(example, element_seed):
        image, label, name = example
        image, label = _as_tensors(image, label)
        label, ok = _checked_label(image, label, name, num_classes, ignore_label, counter)
        if ignore_label != IGNORE_LABEL:
            label = tf.where(label == IGNORE_LABEL, tf.constant(ignore_label, tf.uint8), label)
        if training:
            image, label = _augment(image, label, element_seed, crop_size, scale_range, flip, mean, ignore_label)
        else:
            image = tf.cast(image, tf.float32)
        if not training and crop_size is not None:
            image, label = _padded_to_crop(image, label, name, ok, crop_size, mean, ignore_label)
        if crop_size is not None:
            image.set_shape([crop_size[0], crop_size[1], 3])
            label.set_shape([crop_size[0], crop_size[1]])
        else:
            image.set_shape([None, None, 3])
        out = (image, label, name) if return_file_name else (image, label)
        return out, ok

    return process


def _as_tensors(image, label):
    """The image as a tensor checked to be [H, W, 3] and the label as uint8 [H, W]."""
    label = _label_2d(tf.convert_to_tensor(label))
    if label.dtype != tf.uint8:
        label = tf.cast(label, tf.uint8)
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3 or image.shape[-1] not in (3, None):
        raise ValueError(f"image must be [H, W, 3]; got shape {image.shape}")
    return image, label


def _checked_label(image, label, name, num_classes, ignore_label, counter):
    """(label, ok): asserts size and values (counter None), or notes a bad example in counter and returns ok."""
    same_size, values_ok, bad_values = _validity(image, label, num_classes, ignore_label)
    if counter is None:
        checks = [
            tf.debugging.Assert(same_size, ["deeplab_keras.data: image/label size mismatch in", name,
                                            "image shape", tf.shape(image), "label shape", tf.shape(label)]),
            tf.debugging.Assert(values_ok, ["deeplab_keras.data: label values outside {0..num_classes-1, 255} "
                                            f"(num_classes={num_classes}) in", name, "values", bad_values]),
        ]
        with tf.control_dependencies(checks):
            label = tf.identity(label)
        return label, tf.constant(True)
    ok = same_size & values_ok

    def note():
        reason = tf.strings.format("size image {} vs label {}, bad label values {}",
                                   [tf.shape(image), tf.shape(label), bad_values])
        tf.py_function(counter.note, [name, reason], [])
        return tf.constant(False)

    ok = tf.cond(ok, lambda: tf.constant(True), note)
    # keep shapes consistent for the ops below; the element is filtered out afterwards
    label = tf.cond(same_size, lambda: label, lambda: tf.zeros(tf.shape(image)[:2], tf.uint8))
    return label, ok


def _padded_to_crop(image, label, name, ok, crop_size, mean, ignore_label):
    """Evaluation: pads to crop_size, asserting (for a valid example) that the image fits in it."""
    fits = tf.reduce_all(tf.shape(label) <= tf.constant(crop_size))
    with tf.control_dependencies([tf.debugging.Assert(
            fits | ~ok, ["deeplab_keras.data: image larger than crop_size", list(crop_size), "in", name,
                         "shape", tf.shape(label), "- pass a larger crop_size for evaluation"])]):
        image, label = _pad_to(image, label, crop_size[0], crop_size[1], mean, ignore_label)
        image = image[:crop_size[0], :crop_size[1]]
        label = label[:crop_size[0], :crop_size[1]]
    return image, label


def _batched(ds, counter, repeat, batch_size, drop_remainder, prefetch):
    """Drops the ok flag (filtering bad examples out when skipping), then repeats, batches and prefetches."""
    if counter is not None:
        ds = counter.attach(ds.filter(lambda out, ok: ok).map(lambda out, ok: out))
    else:
        ds = ds.map(lambda out, ok: out)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if prefetch:
        ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds


def distributed_pipeline(strategy, make_ds_fn, global_batch_size, *, seed=None, **pipeline_kwargs):
    """Builds one input pipeline per worker with ``strategy.distribute_datasets_from_function``.

    Each input pipeline reads its own shard of the examples (``Dataset.shard`` by input pipeline id), batches at
    the per-replica batch size and, when seeded, uses ``seed + input_pipeline_id``.

    Args:
        strategy: a ``tf.distribute.Strategy`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``, ...).
        make_ds_fn: returns the example dataset; called with the ``tf.distribute.InputContext`` if it takes an
            argument (then sharding is up to it), else with none (then it is sharded here).
        global_batch_size: batch size summed over all replicas.
        seed: base seed (None = random).
        **pipeline_kwargs: the rest of :func:`make_pipeline`'s arguments (``training``, ``crop_size``, ...).

    Returns:
        a ``tf.distribute.DistributedDataset`` for ``model.fit`` or a custom loop.

    Example:
        >>> strategy = tf.distribute.MirroredStrategy()                              # doctest: +SKIP
        >>> train = distributed_pipeline(strategy, lambda: load_voc("train_aug", data_dir=d), 20,  # doctest: +SKIP
        ...                              training=True, num_classes=21, seed=0)
    """
    takes_context = len(inspect.signature(make_ds_fn).parameters) > 0

    def dataset_fn(context):
        if takes_context:
            ds = make_ds_fn(context)
        else:
            ds = make_ds_fn()
            if context.num_input_pipelines > 1:
                ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
        per_replica = context.get_per_replica_batch_size(global_batch_size)
        pipeline_seed = None if seed is None else int(seed) + context.input_pipeline_id
        return make_pipeline(ds, batch_size=per_replica, seed=pipeline_seed, **pipeline_kwargs)

    return strategy.distribute_datasets_from_function(dataset_fn)
