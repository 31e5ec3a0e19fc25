"""A segmentation dataset from a folder of your own images and index masks.

Layout::

    root/images/<stem>.jpg | .jpeg | .png | .bmp   (RGB, grayscale or palette images)
    root/masks/<stem>.png                          (class indices: palette 'P' or grayscale 'L' PNG, 255 = ignore;
                                                    or RGB colours, read through classes.csv)
    root/classes.txt                               (optional: one class name per line, background first)
    root/classes.csv                               (colour masks: header name,r,g,b; one row per class in index
                                                    order; a row named ``ignore`` maps its colour to 255)

Example:
    >>> from deeplab_keras.data import folder_dataset, write_synthetic_folder
    >>> root = write_synthetic_folder("/tmp/shapes", 4, size=(65, 65), num_classes=3)
    >>> ds = folder_dataset(root)            # num_classes=3 from classes.txt
"""
import os

import numpy as np

from deeplab_keras.data._common import (IGNORE_LABEL, IMAGE_EXTENSIONS, BadDataError, check_label,
                                        decoded_dataset, read_image_rgb, read_index_png)

CLASS_FILE = "classes.txt"
COLOUR_FILE = "classes.csv"
IGNORE_ROW = "ignore"


def read_colour_table(root, colour_file=None):
    """The colour table of a folder dataset with RGB masks: ``(class names, {(r, g, b): index})``, or None when
    there is no ``classes.csv``.

    Args:
        root: dataset folder.
        colour_file: path of the table (default ``root/classes.csv``): header ``name,r,g,b``, one row per class
            in index order; a row named ``ignore`` maps its colour to 255 (and is no class).

    Raises:
        ValueError: one line naming the file and the line that is wrong (header, a value outside 0..255, a
            colour given twice, no classes).

    Example:
        >>> names, colours = read_colour_table("my_data")   # doctest: +SKIP
        >>> colours[(0, 0, 0)], colours[(255, 255, 255)]      # background, the ignore row  # doctest: +SKIP
        (0, 255)
    """
    import csv

    path = colour_file or os.path.join(os.fspath(root), COLOUR_FILE)
    if not os.path.exists(path):
        if colour_file is not None:
            raise FileNotFoundError(f"colour_file {colour_file} does not exist")
        return None
    with open(path, encoding="utf-8", newline="") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows or [c.strip().lower() for c in rows[0]] != ["name", "r", "g", "b"]:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise ValueError(f"{path}: the first line must be the header name,r,g,b (got {got})")
    names, colours = [], {}
    for number, row in enumerate(rows[1:], start=2):
        try:
            name, rgb = row[0].strip(), tuple(int(v) for v in row[1:])
            if len(rgb) != 3 or not name or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
        except ValueError:
            raise ValueError(f"{path} line {number}: expected name,r,g,b with r, g, b in 0..255, got "
                             f"{','.join(row)}") from None
        if rgb in colours:
            raise ValueError(f"{path} line {number}: colour {rgb} is already class "
                             f"{names[colours[rgb]] if colours[rgb] != IGNORE_LABEL else IGNORE_ROW}")
        if name.lower() == IGNORE_ROW:
            colours[rgb] = IGNORE_LABEL
        else:
            colours[rgb] = len(names)
            names.append(name)
    if not names:
        raise ValueError(f"{path} lists no classes; write one row name,r,g,b per class, background first")
    return names, colours


def colours_to_labels(rgb, colours, name):
    """Class indices uint8 [H, W] of an RGB mask [H, W, 3] through ``colours`` ({(r, g, b): index}).

    Raises:
        BadDataError: naming ``name`` and the first colour that is not in the table (and where it is).
    """
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    values, inverse = np.unique(codes, return_inverse=True)
    table = {(r << 16) | (g << 8) | b: index for (r, g, b), index in colours.items()}
    mapped = np.empty(len(values), np.uint8)
    for i, code in enumerate(values):
        if int(code) not in table:
            colour = (int(code) >> 16, (int(code) >> 8) & 255, int(code) & 255)
            row, col = np.argwhere(codes == code)[0]
            raise BadDataError(f"{name}: colour {colour} (first at row {row}, column {col}) is not in {COLOUR_FILE}; "
                               "add a row for it (or a row named ignore) or fix the mask")
        mapped[i] = table[int(code)]
    return mapped[inverse.reshape(codes.shape)]


def read_colour_mask(path, colours):
    """A label PNG as class indices: 'P' / 'L' PNGs hold indices; RGB(A) PNGs go through ``colours``
    (:func:`read_colour_table`; without one an RGB mask is refused by name)."""
    from PIL import Image

    if colours is not None:
        try:
            with Image.open(path) as im:
                rgb_mask = im.mode in ("RGB", "RGBA")
        except (OSError, SyntaxError, ValueError):
            rgb_mask = False  # read_index_png names the undecodable file
        if rgb_mask:
            return colours_to_labels(read_image_rgb(path), colours, path)
    return read_index_png(path)


def read_class_names(root, class_file=None):
    """Class names from ``class_file`` (default ``root/classes.txt``, else the names of ``root/classes.csv``), or
    None when there is no such file.

    Args:
        root: dataset folder.
        class_file: path of a text file with one class name per line (blank lines ignored).
    """
    path = class_file or os.path.join(os.fspath(root), CLASS_FILE)
    if class_file is None and not os.path.exists(path):
        table = read_colour_table(root)
        return None if table is None else table[0]
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


def load_pair(image_path, mask_path, num_classes=None, colours=None):
    """Decodes and checks one pair with PIL; returns (image uint8 [H, W, 3], label uint8 [H, W]).

    Args:
        colours: {(r, g, b): index} of RGB masks (:func:`read_colour_table`), or None (index masks only).

    Raises:
        BadDataError: naming the file that is undecodable, truncated, of another size, out of range, or a colour
            not in the table.
    """
    image = read_image_rgb(image_path)
    label = read_colour_mask(mask_path, colours)
    check_label(label, num_classes, f"{mask_path} (image {image_path})", image.shape)
    return image, label


def folder_dataset(root, num_classes=None, *, class_file=None, images_dir="images", masks_dir="masks",
                   shuffle=False, seed=None, skip_bad=False, num_parallel_calls=None):
    """A ``tf.data.Dataset`` over ``root/images`` + ``root/masks`` (decoded with PIL: masks as indices).

    Args:
        root: dataset folder.
        num_classes: number of classes; default: the number of names in the class file, else no value check.
        class_file: class list file (default ``root/classes.txt`` when present, else the names of
            ``root/classes.csv``, whose colours then decode RGB masks).
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
    names = read_class_names(root, class_file)
    table = read_colour_table(root)
    if names is not None:
        if num_classes is None:
            num_classes = len(names)
        elif num_classes != len(names):
            raise ValueError(f"num_classes={num_classes} but the class file of {root} lists {len(names)} classes")
    colours = table[1] if table is not None else None
    pairs = list_pairs(root, images_dir, masks_dir)
    return decoded_dataset(pairs, lambda image, mask: load_pair(image, mask, num_classes, colours), shuffle=shuffle,
                           seed=seed, skip_bad=skip_bad, num_parallel_calls=num_parallel_calls)
