"""Synthetic segmentation data: textured shapes on textured backgrounds, sharp edges, several classes.

Each class has its own colour and stripe texture, so a small model can learn it; the background (class 0) is a
smooth random texture. Every image is a pure function of ``(seed, index)``: the same seed gives the same data.
The one synthetic-image generator of the package: training / evaluation data (:func:`make_synthetic`, folders) and
export verification images (:func:`synthetic_images`) are all :func:`generate_example`'s scenes.

Example:
    >>> from deeplab_keras.data.synthetic import make_synthetic
    >>> ex = next(iter(make_synthetic(2, size=(33, 47), num_classes=3, seed=1)))
    >>> ex["image"].shape, ex["label"].shape
    (TensorShape([33, 47, 3]), TensorShape([33, 47]))
"""
import io
import os

import numpy as np

from deeplab_keras.data._common import IGNORE_LABEL
from deeplab_keras.data.classes import voc_palette
from deeplab_keras.files import atomic_write_bytes


def _class_colour(c, num_classes):
    """A saturated colour per foreground class, hues spread evenly."""
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((c - 1) / max(num_classes - 1, 1), 0.85, 0.9)
    return np.array([r, g, b]) * 255.0


def generate_example(index, size=(65, 65), num_classes=4, seed=0, boundary_width=0):
    """Generates one synthetic image and its label with NumPy.

    Args:
        index: image index (part of the seed).
        size: (height, width).
        num_classes: classes including background (>= 2).
        seed: dataset seed.
        boundary_width: if > 0, pixels within this distance of a class boundary get the ignore label 255
            (like VOC's boundary band).

    Returns:
        (image uint8 [H, W, 3], label uint8 [H, W]).
    """
    h, w = int(size[0]), int(size[1])
    if num_classes < 2 or num_classes > 255:
        raise ValueError(f"num_classes={num_classes}: expected 2..255 (class 0 is the background)")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Background: dull colour, two low-frequency waves and fine noise.
    base = rng.uniform(40, 140, size=3)
    waves = np.zeros((h, w), np.float32)
    for _ in range(2):
        fy, fx = rng.uniform(-0.08, 0.08, size=2)
        waves += np.sin(fy * yy + fx * xx + rng.uniform(0, 6.3))
    image = base + 18.0 * waves[..., None] + rng.normal(0, 6, size=(h, w, 3))
    label = np.zeros((h, w), np.uint8)
    scale = min(h, w)
    for _ in range(rng.integers(1, 5)):
        c = int(rng.integers(1, num_classes))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.12, 0.35, size=2) * scale
        kind = rng.integers(0, 3)
        if kind == 0:  # ellipse
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        elif kind == 1:  # rotated rectangle
            t = rng.uniform(0, np.pi)
            u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
            v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
            mask = (np.abs(u) <= ry) & (np.abs(v) <= rx)
        else:  # triangle: intersection of three half-planes
            angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
            py, px = cy + ry * np.sin(angles), cx + rx * np.cos(angles)
            signs = []
            for i in range(3):
                j = (i + 1) % 3
                signs.append((px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i]) >= 0)
            mask = (signs[0] == signs[1]) & (signs[1] == signs[2])
        if not mask.any():
            continue
        # Class texture: stripes whose period and angle depend on the class, on the class colour.
        period = 4.0 + 3.0 * (c % 4)
        angle = np.pi * c / num_classes
        stripes = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
        colour = _class_colour(c, num_classes) + rng.uniform(-15, 15, size=3)
        texture = colour + 25.0 * stripes[..., None] + rng.normal(0, 5, size=(h, w, 3))
        image[mask] = texture[mask]
        label[mask] = c
    if boundary_width > 0:
        edge = np.zeros((h, w), bool)
        edge[:, 1:] |= label[:, 1:] != label[:, :-1]
        edge[1:, :] |= label[1:, :] != label[:-1, :]
        band = edge.copy()
        for _ in range(int(boundary_width) - 1):
            grown = band.copy()
            grown[1:] |= band[:-1]
            grown[:-1] |= band[1:]
            grown[:, 1:] |= band[:, :-1]
            grown[:, :-1] |= band[:, 1:]
            band = grown
        label[band] = IGNORE_LABEL
    return np.clip(image, 0, 255).astype(np.uint8), label


def synthetic_images(size, count=4, seed=0, num_classes=4):
    """A batch of synthetic images without labels (``generate_example``'s scenes), e.g. export verification input.

    Args:
        size: (height, width).
        count: number of images.
        seed: dataset seed (image ``i`` is ``generate_example(i, size, num_classes, seed)``'s).
        num_classes: classes including background (the number of distinct textures).

    Returns:
        uint8 array ``[count, height, width, 3]``.

    Example:
        >>> synthetic_images((33, 47), 2, seed=1).shape
        (2, 33, 47, 3)
    """
    return np.stack([generate_example(i, size, num_classes, seed)[0] for i in range(int(count))])


def make_synthetic(num_images, size=(65, 65), num_classes=4, seed=0, boundary_width=0):
    """A ``tf.data.Dataset`` of synthetic examples (generated on the fly, deterministic per ``seed``).

    Args:
        num_images: number of examples.
        size: (height, width) of every image.
        num_classes: classes including background.
        seed: dataset seed.
        boundary_width: width of a 255 (ignore) band along class boundaries; 0 = none.

    Returns:
        ``tf.data.Dataset`` of dicts ``{"image": uint8 [H, W, 3], "label": uint8 [H, W], "file_name"}``.
    """
    import tensorflow as tf
    h, w = int(size[0]), int(size[1])
    generate_example(0, (h, w), num_classes, seed)  # validate arguments now, not inside tf.data

    def gen(i):
        return generate_example(int(i), (h, w), num_classes, seed, boundary_width)

    def to_dict(i):
        image, label = tf.numpy_function(gen, [i], [tf.uint8, tf.uint8], stateful=False)
        image.set_shape([h, w, 3])
        label.set_shape([h, w])
        name = tf.strings.format("synthetic_{}_{}", [tf.constant(int(seed), tf.int64), i])
        return {"image": image, "label": label, "file_name": name}

    return tf.data.Dataset.range(int(num_images)).map(to_dict, num_parallel_calls=tf.data.AUTOTUNE,
                                                       deterministic=True)


def class_names(num_classes):
    """Names of the synthetic classes: ``background, class_1, ...``."""
    return ["background"] + [f"class_{c}" for c in range(1, num_classes)]


def write_synthetic_folder(root, num_images, size=(65, 65), num_classes=4, seed=0, boundary_width=0,
                           quality=95):
    """Writes synthetic data in the folder-dataset layout and returns ``root``.

    Layout: ``root/images/synthetic_00000.jpg`` (JPEG), ``root/masks/synthetic_00000.png`` (palette PNG of
    class indices, VOC palette) and ``root/classes.txt`` (one class name per line). Files are written atomically.

    Args:
        root: output folder (created).
        num_images: number of examples.
        size: (height, width).
        num_classes: classes including background.
        seed: dataset seed (same as :func:`make_synthetic`'s: same labels).
        boundary_width: width of the 255 band along class boundaries; 0 = none.
        quality: JPEG quality.
    """
    from PIL import Image
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    for i in range(int(num_images)):
        image, label = generate_example(i, size, num_classes, seed, boundary_width)
        stem = f"synthetic_{i:05d}"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        atomic_write_bytes(os.path.join(root, "images", stem + ".jpg"), buf.getvalue())
        mask = Image.fromarray(label)  # mode "L": pixel values are the indices
        mask.putpalette(palette)  # "L" -> "P", values unchanged
        buf = io.BytesIO()
        mask.save(buf, format="PNG")
        atomic_write_bytes(os.path.join(root, "masks", stem + ".png"), buf.getvalue())
    atomic_write_bytes(os.path.join(root, "classes.txt"), ("\n".join(class_names(num_classes)) + "\n").encode())
    return root
