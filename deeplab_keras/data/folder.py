"""A segmentation dataset from a folder of your own images and index masks.

Layout::

    root/images/<stem>.jpg | .jpeg | .png | .bmp   (RGB, grayscale or palette images)
    root/masks/<stem>.png                          (class indices: palette 'P' or grayscale 'L' PNG, 255 = ignore)
    root/classes.txt                               (optional: one class name per line, background first)

Example:
    >>> from deeplab_keras.data import folder_dataset, write_synthetic_folder
    >>> root = write_synthetic_folder("/tmp/shapes", 4, size=(65, 65), num_classes=3)
    >>> ds = folder_dataset(root)            # num_classes=3 from classes.txt
"""
import os

import numpy as np

from deeplab_keras.data._common import (IMAGE_EXTENSIONS, BadDataError, SkipCounter, check_label,
                                        read_image_rgb, read_index_png)

CLASS_FILE = "classes.txt"


def read_class_names(root, class_file=None):
    """Class names from ``class_file`` (default ``root/classes.txt``), or None when there is no such file.

    Args:
        root: dataset folder.
        class_file: path of a text file with one class name per line (blank lines ignored).
    """
    path = class_file or os.path.join(os.fspath(root), CLASS_FILE)
    if not os.path.exists(path):
        if class_file is not None:
            raise FileNotFoundError(f"class_file {class_file} does not exist")
        return None
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"class file {path} has no class names; write one name per line, background first")
    return names


def list_pairs(root, images_dir="images", masks_dir="masks"):
    """Sorted (image path, mask path) pairs matched by file stem.

    Raises:
        FileNotFoundError: a folder is missing, empty, or an image has no mask (the files are named).
    """
    root = os.fspath(root)
    image_root, mask_root = os.path.join(root, images_dir), os.path.join(root, masks_dir)
    for folder in (image_root, mask_root):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} does not exist: a folder dataset needs {image_root}/<stem>.jpg|png "
                                    f"and {mask_root}/<stem>.png (index PNGs)")
    images = {}
    for name in sorted(os.listdir(image_root)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            if stem in images:
                raise ValueError(f"two images with the stem {stem!r} in {image_root}: {images[stem]} and {name}")
            images[stem] = name
    if not images:
        raise FileNotFoundError(f"{image_root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    masks = {os.path.splitext(n)[0] for n in os.listdir(mask_root) if n.lower().endswith(".png")}
    missing = [os.path.join(mask_root, s + ".png") for s in images if s not in masks]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) have no mask, e.g. {', '.join(missing[:5])}: add the index "
                                "PNGs or remove those images")
    return [(os.path.join(image_root, images[s]), os.path.join(mask_root, s + ".png")) for s in sorted(images)]


def load_pair(image_path, mask_path, num_classes=None):
    """Decodes and checks one pair with PIL; returns (image uint8 [H, W, 3], label uint8 [H, W]).

    Raises:
        BadDataError: naming the file that is undecodable, truncated, of another size or out of range.
    """
    image = read_image_rgb(image_path)
    label = read_index_png(mask_path)
    check_label(label, num_classes, f"{mask_path} (image {image_path})", image.shape)
    return image, label


def folder_dataset(root, num_classes=None, *, class_file=None, images_dir="images", masks_dir="masks",
                   shuffle=False, seed=None, skip_bad=False, num_parallel_calls=None):
    """A ``tf.data.Dataset`` over ``root/images`` + ``root/masks`` (decoded with PIL: masks as indices).

    Args:
        root: dataset folder.
        num_classes: number of classes; default: the number of names in the class file, else no value check.
        class_file: class list file (default ``root/classes.txt`` when present).
        images_dir, masks_dir: sub-folder names.
        shuffle: shuffle the file order (before decoding, so it costs no memory) each pass.
        seed: seed of that shuffle.
        skip_bad: skip undecodable/truncated files, size mismatches and out-of-range labels (logging each and
            a count at the end of every pass) instead of raising.
        num_parallel_calls: decode parallelism (default ``tf.data.AUTOTUNE``).

    Returns:
        ``tf.data.Dataset`` of dicts ``{"image": uint8 [H, W, 3], "label": uint8 [H, W], "file_name"}``
        (``file_name`` is the image path). Bad files raise an error naming the file during iteration.
    """
    import tensorflow as tf
    names = read_class_names(root, class_file)
    if names is not None:
        if num_classes is None:
            num_classes = len(names)
        elif num_classes != len(names):
            raise ValueError(f"num_classes={num_classes} but the class file of {root} lists {len(names)} classes")
    pairs = list_pairs(root, images_dir, masks_dir)
    counter = SkipCounter("file") if skip_bad else None

    def decode(image_path, mask_path):
        image_path, mask_path = image_path.decode(), mask_path.decode()
        try:
            image, label = load_pair(image_path, mask_path, num_classes)
        except BadDataError as e:
            if counter is None:
                raise
            counter.note(image_path, e)
            return np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint8), False
        return image, label, True

    def to_dict(image_path, mask_path):
        image, label, ok = tf.numpy_function(decode, [image_path, mask_path], [tf.uint8, tf.uint8, tf.bool],
                                             stateful=False)
        image.set_shape([None, None, 3])
        label.set_shape([None, None])
        return {"image": image, "label": label, "file_name": image_path}, ok

    ds = tf.data.Dataset.from_tensor_slices(([p[0] for p in pairs], [p[1] for p in pairs]))
    if shuffle:
        ds = ds.shuffle(len(pairs), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(to_dict, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=True)
    if counter is None:
        return ds.map(lambda example, ok: example)
    ds = ds.filter(lambda example, ok: ok).map(lambda example, ok: example)
    return counter.attach(ds)
