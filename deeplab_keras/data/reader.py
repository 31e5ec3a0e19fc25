"""Shared helpers of deeplab_keras.data: the package's one image reader (PIL, errors that name the file), label
checks and the counter behind ``skip_bad``."""
import errno
import logging
import os
import stat
import threading

import numpy as np

logger = logging.getLogger("deeplab_keras.data")

IGNORE_LABEL = 255

class BadDataError(ValueError):
    """A data file cannot be used (undecodable, truncated, size mismatch, label value out of range)."""


# Modes PIL converts to RGB faithfully; 16-bit grayscale is scaled here; anything else is refused by name.
_RGB_CONVERTIBLE = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"}
_GRAY16 = {"I;16", "I;16L", "I;16B", "I;16N"}


# File extensions the package treats as images (predict inputs, folder datasets, export samples): what
# read_image_rgb decodes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_image_rgb(path, max_pixels=None):
    """Decodes an image file fully with PIL into uint8 RGB [H, W, 3]: the one image reader of the package.

    16-bit grayscale (PIL mode ``I;16``) is scaled to 0..255 (value / 257, rounded); alpha is dropped;
    32-bit integer/float and other modes without a 0..255 meaning are refused rather than clipped.

    Args:
        path: image file (JPEG, PNG, BMP, TIFF, ...).
        max_pixels: refuse images with more pixels (checked from the header, before decoding); None: PIL's
            own decompression-bomb limit only.

    Raises:
        BadDataError: naming ``path`` when the file is missing, a dangling symlink or symlink loop, empty,
            undecodable, truncated, too large or of an unsupported mode.

    Example:
        >>> from deeplab_keras.data.reader import read_image_rgb
        >>> image = read_image_rgb("photo.png", max_pixels=50_000_000)   # doctest: +SKIP
    """
    from PIL import Image
    path = os.fspath(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise BadDataError(f"{path}: {width}x{height} = {width * height} pixels is over the limit of "
                                   f"{max_pixels} (raise it with --max-pixels if the image is genuine)")
            im.load()
            if im.mode in _GRAY16:
                gray = np.asarray(im).astype(np.uint32)
                return np.repeat(((gray * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=-1)
            if im.mode not in _RGB_CONVERTIBLE:
                raise BadDataError(f"{path}: image mode {im.mode!r} has no 0..255 colour range this reader "
                                   "can map to RGB; save it as an 8-bit (or 16-bit grayscale) image")
            return np.asarray(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8)
    except BadDataError:
        raise
    except Image.DecompressionBombError as e:
        raise BadDataError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for unreadable/truncated files
        raise BadDataError(f"{path}: cannot decode image ({e}); re-export or remove the file") from None


def _check_file(path):
    """Raises BadDataError naming ``path`` if it is not a readable, non-empty regular file."""
    try:
        info = os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            if e.errno == errno.ELOOP:
                raise BadDataError(f"{path}: symbolic link loop; fix or remove the link") from None
            raise BadDataError(f"{path}: dangling symbolic link (its target {os.readlink(path)!r} does not exist); "
                               "fix or remove the link") from None
        raise BadDataError(f"{path}: cannot read the file ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadDataError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise BadDataError(f"{path}: the file is empty (0 bytes)")


def read_index_png(path):
    """Reads a label PNG as class indices (palette indices for mode 'P', values for 'L'), uint8 [H, W].

    Args:
        path: a palette-indexed ('P') or 8-bit grayscale ('L') PNG.

    Raises:
        BadDataError: naming ``path`` for an undecodable file or an RGB label (colours are not indices).
    """
    from PIL import Image
    _check_file(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise BadDataError(
                    f"{path}: label PNG has mode {im.mode!r}; expected a palette-indexed ('P') or 8-bit grayscale "
                    "('L') PNG whose pixel values are class indices (convert colours to indices first)")
            return np.asarray(im, dtype=np.uint8)
    except BadDataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise BadDataError(f"{path}: cannot decode label PNG ({e}); re-export or remove the file") from e


def image_size(path):
    """(height, width) of an image from its header, without decoding. Raises BadDataError naming the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, SyntaxError, ValueError) as e:
        raise BadDataError(f"{path}: cannot read image header ({e})") from e


def check_label(label, num_classes, name, image_shape=None, ignore_label=IGNORE_LABEL):
    """Checks a decoded label: size equal to the image's, values within {0..num_classes-1, 255}.

    Args:
        label: uint8 [H, W] array.
        num_classes: number of classes, or None to skip the value check.
        name: the file named in the error.
        image_shape: the image's shape (H, W, ...), or None to skip the size check.
        ignore_label: the extra value allowed (255).

    Raises:
        BadDataError: naming ``name``.
    """
    if image_shape is not None and tuple(label.shape[:2]) != tuple(image_shape[:2]):
        raise BadDataError(f"{name}: label size {tuple(label.shape[:2])} != image size {tuple(image_shape[:2])} "
                           "(height, width); image and label must have the same size")
    if num_classes is not None:
        values = np.unique(label)
        bad = values[(values >= num_classes) & (values != ignore_label) & (values != IGNORE_LABEL)]
        if bad.size:
            raise BadDataError(f"{name}: label values {bad.tolist()[:10]} outside {{0..{num_classes - 1}, "
                               f"{ignore_label}}}; fix the mask or pass the right num_classes")


def decoded_dataset(items, decode, *, file_names=None, shuffle=False, seed=None, skip_bad=False,
                    num_parallel_calls=None):
    """A ``tf.data.Dataset`` of example dicts decoded from files by ``decode`` (a Python function in
    ``tf.numpy_function``): the one file-list reader behind folder datasets and the benchmark layouts.

    Args:
        items: list of tuples of strings (file paths) passed to ``decode``.
        decode: ``(*item) -> (image uint8 [H, W, 3], label uint8 [H, W])``; raises BadDataError naming the file.
        file_names: the ``file_name`` of each item (default: its first string).
        shuffle, seed: shuffle the item order (before decoding) each pass, with this seed.
        skip_bad: log and skip items whose decode raises BadDataError (with a count per pass) instead of raising.
        num_parallel_calls: decode parallelism (default ``tf.data.AUTOTUNE``).

    Example:
        >>> ds = decoded_dataset([("a.jpg", "a.png")],
        ...                      lambda i, m: (read_image_rgb(i), read_index_png(m)))  # doctest: +SKIP
    """
    import tensorflow as tf

    counter = SkipCounter("file") if skip_bad else None
    items = [tuple(os.fspath(p) for p in item) for item in items]
    names = list(file_names) if file_names is not None else [item[0] for item in items]

    def run(*paths):
        paths = [p.decode() for p in paths]
        try:
            image, label = decode(*paths)
        except BadDataError as e:
            if counter is None:
                raise
            counter.note(paths[0], e)
            return np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint8), False
        return image, label, True

    def to_dict(name, *paths):
        image, label, ok = tf.numpy_function(run, list(paths), [tf.uint8, tf.uint8, tf.bool], stateful=False)
        image.set_shape([None, None, 3])
        label.set_shape([None, None])
        return {"image": image, "label": label, "file_name": name}, ok

    ds = tf.data.Dataset.from_tensor_slices((names,) + tuple(list(column) for column in zip(*items)))
    if shuffle:
        ds = ds.shuffle(len(items), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(to_dict, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=True)
    if counter is None:
        return ds.map(lambda example, ok: example)
    ds = ds.filter(lambda example, ok: ok).map(lambda example, ok: example)
    return counter.attach(ds)


class SkipCounter:
    """Counts elements skipped by ``skip_bad`` and logs the total when the input is exhausted."""

    def __init__(self, what):
        self.what = what
        self._lock = threading.Lock()
        self.count = 0
        self.total = 0

    def note(self, name, reason):
        """Records one skipped element (called from tf.py_function / numpy_function)."""
        with self._lock:
            self.count += 1
            self.total += 1
        logger.warning("skipping bad %s %s: %s", self.what, _text(name), _text(reason))

    def summary(self):
        """Logs and resets the count of this pass over the data."""
        with self._lock:
            count, self.count = self.count, 0
        if count:
            logger.warning("skipped %d bad %s(s) in this pass over the data (skip_bad=True)", count, self.what)
        return count

    def attach(self, ds):
        """Returns ``ds`` followed by an empty sentinel that logs the summary once ``ds`` is exhausted."""
        import tensorflow as tf

        spec = ds.element_spec

        def empty(s):
            shape = [d if d is not None else 0 for d in s.shape]
            return tf.fill(shape, "") if s.dtype == tf.string else tf.zeros(shape, s.dtype)

        def log_summary(_):
            count = tf.py_function(lambda: np.int64(self.summary()), [], tf.int64)
            with tf.control_dependencies([count]):
                return tf.nest.map_structure(lambda s: tf.identity(empty(s)), spec)

        sentinel = tf.data.Dataset.range(1).map(log_summary).filter(lambda *_: tf.constant(False))
        return ds.concatenate(sentinel)


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "numpy"):
        return _text(value.numpy())
    return str(value)


def tf_error_line(error):
    """The one informative line of a TensorFlow runtime error from a data pipeline or a graph check: the
    :class:`BadDataError` message raised inside ``tf.data``, a ``tf.debugging.Assert`` message, else the last
    meaningful line (without TensorFlow's node and stack-trace decoration).

    Example:
        >>> tf_error_line(err)   # doctest: +SKIP
        'masks/a.png: label value 7 is outside 0..4 and 255; ...'
    """
    import re

    text = getattr(error, "message", None) or str(error)
    failed = re.search(r"assertion failed: (.*)", text)
    if failed:  # tf.debugging.Assert: "[message] [value] ..." -> "message value ..."
        return re.sub(r"\[([^\[\]]*)\]", r"\1", failed.group(1)).strip()
    found = re.search(r"BadDataError: ([^\n]+)", text)
    if found:
        return found.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(
        ("[[", "Detected at node", "<stack traces", "Graph execution error"))]
    line = lines[-1] if lines else type(error).__name__
    line = re.sub(r"\{\{[^}]*\}\}\s*", "", line)
    line = re.sub(r"^Error in user-defined function .*? transformation with iterator: \S+: ", "", line)
    return re.sub(r"^[\w.]+\.(\w+Error): ", "", line)  # "deeplab_keras.data.reader.BadDataError: ..." -> "..."


def read_split_ids(path):
    """The image ids of a split list (``train.txt``: one id per line, extra columns and blank lines ignored).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "val.txt")
        >>> _ = open(path, "w").write("2007_000033\\n\\n2007_000042 1\\n")
        >>> read_split_ids(path)
        ['2007_000033', '2007_000042']
    """
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]
