"""Small shared helpers without heavy imports: PASCAL VOC names and palette, atomic file writes."""
import json
import os
import tempfile

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def voc_palette():
    """The PASCAL VOC colour map (the palette of VOC's own SegmentationClass PNGs) as [256, 3] uint8.

    Colour bits are the class index's bits interleaved: bit 3j+c of the index is bit 7-j of channel c.
    """
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        code, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[index] = rgb
    return palette


def atomic_write_bytes(path, data, overwrite=True):
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename (never half written).

    Args:
        path: destination file.
        data: bytes (or str, written as UTF-8).
        overwrite: if False, an existing ``path`` raises FileExistsError.
    """
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                               suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def atomic_write_json(path, obj, indent=1):
    """Write ``obj`` as JSON (numpy values converted) atomically; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    atomic_write_bytes(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")
    return os.fspath(path)
