"""Read a Caffe ``.caffemodel`` (a binary protobuf ``NetParameter``) without Caffe or protobuf.

The file is a flat sequence of ``layer`` fields (100; the old ``layers`` field 2 of V1 files is read too). This
module decodes the wire format itself, one layer at a time (the file is streamed, never held whole in memory).
It knows nothing of the Keras model: :mod:`deeplab_keras.weights.importer` maps the layers onto one.

The file is untrusted input: the reader only moves forward (time linear in the file size), checks every length,
count, wire type and blob shape against the bytes that remain and its caps before allocating, and turns every
malformed input into a one-line :class:`CaffeModelError` naming the file (``tests/test_readers_fuzz.py`` fuzzes it).

Example:
    >>> from deeplab_keras.weights.caffe_reader import read_caffemodel
    >>> [layer.name for layer in read_caffemodel("train2_iter_20000.caffemodel")][:2]   # doctest: +SKIP
    ['data', 'conv1']
"""
import hashlib
import math
import os
import struct
from typing import NamedTuple

import numpy as np

class CaffeModelError(ValueError):
    """A ``.caffemodel`` that cannot be read or does not fit the model (one-line message naming the file)."""


class CaffeLayer(NamedTuple):
    """One layer of a ``.caffemodel``.

    ``blobs`` are read-only float32 arrays in Caffe's shapes (views into the layer's bytes, not copies);
    ``pooling`` / ``convolution`` / ``batch_norm`` are the layer's parameters as dicts, or None.
    """
    name: str
    type: str
    blobs: list
    pooling: dict = None
    convolution: dict = None
    batch_norm: dict = None


# ----------------------------------------------------------------------------------------------------------
# Protobuf wire format
# ----------------------------------------------------------------------------------------------------------
_NET_FIELDS = {1: 2, 2: 2, 3: 2, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 100: 2}  # NetParameter field -> wire type
_V1_TYPES = {3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout", 14: "InnerProduct", 15: "LRN",
             17: "Pooling", 18: "ReLU", 20: "Softmax", 21: "SoftmaxWithLoss", 25: "Eltwise", 39: "Deconvolution"}
_POOL_METHODS = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}
_MAX_DIMS = 8               # dimensions of a blob
_MAX_REPEATED = 64          # values of a repeated number field (pad, kernel_size, a shape's dims)
_MAX_VALUES = 1 << 31       # one dimension of a blob
MAX_LAYER_BYTES = 1 << 31   # one layer's bytes (the released files' largest layer is ~38 MB)


class _Corrupt(Exception):
    """Internal: the bytes are not a well-formed message (turned into a CaffeModelError with the file name)."""


def _varint(buf, pos, end):
    result, shift = 0, 0
    while True:
        if pos >= end:
            raise _Corrupt("a number runs past the end of its message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("a number is longer than 10 bytes")


def _float_run(buf, pos, end, key):
    """Length of the run of unpacked fixed32 records (one ``key`` byte + 4 bytes) starting at ``pos``, the first
    key already read. The records are scanned in doubling windows, so a run costs time linear in its own
    length (never in what follows it)."""
    count, window = 0, 16
    while True:
        start = pos - 1 + count * 5
        fit = min(window, (end - start) // 5)
        if fit <= 0:
            if count == 0:
                raise _Corrupt("a float runs past the end of its message")
            return count
        run = np.frombuffer(buf, np.uint8, count=fit * 5, offset=start).reshape(fit, 5)
        stop = np.flatnonzero(run[:, 0] != key)
        if stop.size:
            return count + int(stop[0])
        count += fit
        window *= 2


def _fields(buf, pos, end, float_runs=None):
    """Yield (field, wire type, value) of one message; value is an int (varint), bytes (fixed) or a
    (start, stop) slice for length-delimited fields. Unpacked floats of field ``float_runs`` (one key byte and
    4 bytes per value; ``float_runs`` < 16) come as one float32 array per run of consecutive values.

    Every step moves forward and every length is checked against ``end`` before it is used, so a message is
    read in time linear in its size."""
    run_key = float_runs << 3 | 5 if float_runs is not None else None
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if key == run_key and buf[pos - 1] == run_key:  # a one-byte key: the records are 5 bytes each
            n = _float_run(buf, pos, end, run_key)
            run = np.frombuffer(buf, np.uint8, count=n * 5, offset=pos - 1).reshape(n, 5)
            pos += n * 5 - 1
            yield field, wire, np.ascontiguousarray(run[:, 1:]).view("<f4").ravel()
            continue
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if n > end - pos:
                raise _Corrupt(f"field {field} declares {n:,} bytes, its message has {end - pos:,} left")
            value = (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if size > end - pos:
                raise _Corrupt(f"field {field} runs past the end of its message")
            value = bytes(buf[pos:pos + size])
            pos += size
        else:
            raise _Corrupt(f"wire type {wire} (field {field})")
        yield field, wire, value


def _string(buf, span):
    return printable(bytes(buf[span[0]:span[1]]).decode("utf-8", "replace"))


def printable(text, limit=200):
    """``text`` (a name read from a file) safe for a one-line message: control characters escaped, cut at
    ``limit`` characters.

    Example:
        >>> printable("conv1\\nrm -rf")
        'conv1\\\\nrm -rf'
    """
    text = str(text)[:limit]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _packed_varints(buf, span, limit=_MAX_REPEATED):
    out, pos = [], span[0]
    while pos < span[1]:
        if len(out) >= limit:
            raise _Corrupt(f"more than {limit} values in a repeated number field")
        value, pos = _varint(buf, pos, span[1])
        out.append(value)
    return out


def _repeated_uint(values, wire, value, buf):
    """Append a repeated uint32 field (proto2 writes it unpacked; accept packed too)."""
    values.extend(_packed_varints(buf, value) if wire == 2 else [value])
    if len(values) > _MAX_REPEATED:
        raise _Corrupt(f"more than {_MAX_REPEATED} values in a repeated number field")


def _blob_shape(buf, span):
    """BlobShape -> list of dims (int64, packed or not)."""
    shape = []
    for f, w, v in _fields(buf, *span):
        if f == 1 and w in (0, 2):
            _repeated_uint(shape, w, v, buf)
        elif f == 1:
            raise _Corrupt(f"a blob shape dimension of wire type {w} (a number is expected)")
    return shape


def _float_data(buf, field, wire, value):
    """float32 values of a blob's data (5) or double_data (8; rare, converted) field."""
    if isinstance(value, np.ndarray):  # a run of unpacked floats
        return value
    size = 4 if field == 5 else 8
    if wire != 2:
        data = np.frombuffer(value, f"<f{size}")
    elif (value[1] - value[0]) % size:
        raise _Corrupt(f"{'float' if size == 4 else 'double'} data whose length is not a multiple of {size}")
    else:
        data = np.frombuffer(buf, f"<f{size}", count=(value[1] - value[0]) // size, offset=value[0])
    with np.errstate(over="ignore", invalid="ignore"):  # doubles past float32 become inf (the importer refuses them)
        return data if size == 4 else data.astype(np.float32)


def _decode_blob(buf, start, end):
    """BlobProto -> float32 array in its Caffe shape (a view into ``buf`` for packed float data)."""
    chunks, shape, legacy = [], None, [0, 0, 0, 0]
    for field, wire, value in _fields(buf, start, end, float_runs=5):
        if (field == 5 and wire in (2, 5)) or (field == 8 and wire in (1, 2)):
            chunks.append(_float_data(buf, field, wire, value))
        elif field == 7 and wire == 2:
            shape = _blob_shape(buf, value)
        elif field in (5, 7, 8):
            raise _Corrupt(f"blob field {field} has wire type {wire}")
        elif field in (1, 2, 3, 4) and wire == 0:
            legacy[field - 1] = value
    data = chunks[0] if len(chunks) == 1 else (np.concatenate(chunks) if chunks else np.zeros(0, np.float32))
    if shape is None:
        shape = legacy if any(legacy) else [data.size]
    if not shape or len(shape) > _MAX_DIMS:
        raise _Corrupt(f"a blob with {len(shape)} dimensions (1 to {_MAX_DIMS} expected)")
    if min(shape) <= 0 or max(shape) > _MAX_VALUES:
        raise _Corrupt(f"a blob of shape {tuple(shape)} (every dimension must be 1 to {_MAX_VALUES:,})")
    if math.prod(shape) != data.size:
        raise _Corrupt(f"a blob of shape {tuple(shape)} holds {data.size} values")
    return data.astype(np.float32, copy=False).reshape(shape)


def _decode_layer(buf, v1):
    """LayerParameter (or V1LayerParameter) bytes -> CaffeLayer."""
    names = (4, 5, 6, 10, 19) if v1 else (1, 2, 7, 106, 121)
    f_name, f_type, f_blob, f_conv, f_pool = names
    name, type_, blobs, conv, pool, bn = None, None, [], None, None, None
    end = len(buf)
    for field, wire, value in _fields(buf, 0, end):
        if field == f_name and wire == 2:
            name = _string(buf, value)
        elif field == f_type and (wire == 2 or (v1 and wire == 0)):
            type_ = _V1_TYPES.get(value, f"V1Type{value}") if wire == 0 else _string(buf, value)
        elif field == f_blob and wire == 2:
            blobs.append(_decode_blob(buf, *value))
        elif field in (f_name, f_type, f_blob):
            raise _Corrupt(f"layer field {field} has wire type {wire}")
        elif field == f_conv and wire == 2:
            conv = _conv_param(buf, value)
        elif field == f_pool and wire == 2:
            pool = _pool_param(buf, value)
        elif not v1 and field == 139 and wire == 2:
            bn = {"eps": 1e-5, "use_global_stats": None}
            for f, w, v in _fields(buf, *value):
                if f == 3 and w == 5:
                    bn["eps"] = struct.unpack("<f", v)[0]
                elif f == 1 and w == 0:
                    bn["use_global_stats"] = bool(v)
    if name is None or type_ is None:
        raise _Corrupt("a layer without a name or type")
    return CaffeLayer(name, type_, blobs, pool, conv, bn)


def _conv_param(buf, span):
    out = {"num_output": None, "bias_term": True, "pad": [], "kernel_size": [], "stride": [], "dilation": []}
    keys = {3: "pad", 4: "kernel_size", 6: "stride", 18: "dilation"}
    for field, wire, value in _fields(buf, *span):
        if field == 1 and wire == 0:
            out["num_output"] = value
        elif field == 2 and wire == 0:
            out["bias_term"] = bool(value)
        elif field in keys and wire in (0, 2):
            _repeated_uint(out[keys[field]], wire, value, buf)
    for key, default in (("pad", 0), ("stride", 1), ("dilation", 1), ("kernel_size", None)):
        out[key] = out[key][0] if out[key] else default
    return out


def _pool_param(buf, span):
    out = {"pool": "MAX", "kernel_size": None, "stride": 1, "pad": 0}
    keys = {2: "kernel_size", 3: "stride", 4: "pad"}
    for field, wire, value in _fields(buf, *span):
        if field == 1 and wire == 0:
            out["pool"] = _POOL_METHODS.get(value, str(value))
        elif field in keys and wire == 0:
            out[keys[field]] = value
    return out


def _not_caffemodel(path, head):
    kinds = ((b"PK\x03\x04", "a zip archive (a .keras or .pth file?)"), (b"\x89HDF", "an HDF5 file"),
             (b"\x80", "a Python pickle (a legacy .pth file?)"))
    what = next((k for magic, k in kinds if head.startswith(magic)), None)
    if what is None and head[:64].lstrip()[:6] in (b"name: ", b"layer ", b"layer{", b"input:"):
        what = "a text .prototxt (the network description, not its weights)"
    return CaffeModelError(f"{path} is not a .caffemodel (a binary Caffe NetParameter)"
                           + (f": it looks like {what}" if what else "") + "; pass the released .caffemodel file")


def _read_varint_from(f, path):
    result, shift = 0, 0
    while True:
        byte = f.read(1)
        if not byte:
            raise CaffeModelError(f"{path} is truncated (a field header is cut off); download the file again")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise _not_caffemodel(path, b"")


def read_caffemodel(path):
    """Stream the layers of a ``.caffemodel``, one :class:`CaffeLayer` at a time.

    The file is read in one pass; only the current layer's bytes are in memory and its blobs are views into
    them, so reading a 180 MB file needs about one layer's worth of memory (keep a layer only as long as
    needed).

    Args:
        path: the ``.caffemodel`` file.

    Yields:
        CaffeLayer(name, type, blobs, pooling, convolution, batch_norm), in file order (layers without
        weights, such as ReLU or Pooling, included).

    Raises:
        CaffeModelError: the file is missing, truncated or not a ``.caffemodel``.

    Example:
        >>> for layer in read_caffemodel("train2_iter_20000.caffemodel"):     # doctest: +SKIP
        ...     print(layer.name, layer.type, [b.shape for b in layer.blobs])
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CaffeModelError(f"{path} does not exist (or is not a file); pass a .caffemodel file")
    try:
        yield from _read_layers(path)
    except OSError as e:
        raise CaffeModelError(f"{path} cannot be read ({e.strerror or e}); check the file and its permissions") \
            from None


def _read_layers(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
        f.seek(0)
        if not head:
            raise CaffeModelError(f"{path} is empty; pass a .caffemodel file")
        layers = 0
        while f.tell() < size:
            at = f.tell()
            key = _read_varint_from(f, path)
            field, wire = key >> 3, key & 7
            if _NET_FIELDS.get(field) != wire:
                raise _not_caffemodel(path, head) if at == 0 or not layers else CaffeModelError(
                    f"{path} is corrupt: unexpected field {field} (wire type {wire}) at byte {at}")
            if wire == 0:
                _read_varint_from(f, path)
                continue
            n = _read_varint_from(f, path)
            if f.tell() + n > size:
                raise CaffeModelError(f"{path} is truncated: the field at byte {at} needs {n:,} bytes, "
                                      f"{size - f.tell():,} are left; download the file again")
            if n > MAX_LAYER_BYTES and field in (100, 2):
                raise CaffeModelError(f"{path}: the layer at byte {at} has {n:,} bytes, over the reader's cap of "
                                      f"{MAX_LAYER_BYTES:,} (no DeepLab v2 layer is this large)")
            if field not in (100, 2):
                f.seek(n, os.SEEK_CUR)
                continue
            buf = f.read(n)
            try:
                layer = _decode_layer(buf, v1=(field == 2))
            except _Corrupt as e:
                if not layers:
                    raise _not_caffemodel(path, head) from None
                raise CaffeModelError(f"{path} is corrupt: layer #{layers + 1} at byte {at}: {e}") from None
            layers += 1
            yield layer
        if not layers:
            raise _not_caffemodel(path, head)


class Scan(NamedTuple):
    """What an importer knows about a weights file before loading it
    (see :func:`deeplab_keras.weights.importer.load_scan`)."""
    path: str
    layers: list          # CaffeLayer with blobs replaced by their shapes (tuples), file order
    digests: dict         # layer name -> digest of its blobs (to check the MSC copies)
    source: object        # () -> iterator of CaffeLayer with the blobs, for loading
    names: dict = None    # Caffe name -> the file's own name, for messages (.pth)
    nonfinite: dict = None  # layer name -> how many of its values (as loaded) are NaN or infinite, when any

    def display(self, name):
        return (self.names or {}).get(name, name)


def nonfinite_count(layer):
    """How many of ``layer``'s values are NaN or infinite as the importer loads them (BatchNorm statistics
    divided by their scale factor, as Caffe does).

    Example:
        >>> nonfinite_count(CaffeLayer("conv1", "Convolution", [np.array([1.0, np.nan], np.float32)]))
        1
    """
    blobs = list(layer.blobs)
    if layer.type == "BatchNorm" and len(blobs) == 3:
        blobs[:2] = bn_statistics(blobs)
    return sum(int(b.size - np.count_nonzero(np.isfinite(b))) for b in blobs)


def bn_statistics(blobs):
    """Caffe BatchNorm blobs (mean * s, var * s, [s]) -> float32 (mean, var), flat: divided by s as Caffe does
    (s == 0 gives 0).

    Example:
        >>> bn_statistics([np.array([2.0, 4.0]), np.array([6.0, 8.0]), np.array([2.0])])[1].tolist()
        [3.0, 4.0]
    """
    s = float(blobs[2].reshape(-1)[0])
    factor = 0.0 if s == 0 else 1.0 / s
    with np.errstate(over="ignore", invalid="ignore"):
        return [(b.reshape(-1).astype(np.float64) * factor).astype(np.float32) for b in blobs[:2]]


def scan_caffemodel(path):
    """One streaming pass: every layer's metadata and blob shapes, a digest of each layer's weights, and the
    layers holding non-finite values."""
    path = os.fspath(path)
    layers, digests, nonfinite = [], {}, {}
    for layer in read_caffemodel(path):
        bad = nonfinite_count(layer)
        if bad:
            nonfinite[layer.name] = nonfinite.get(layer.name, 0) + bad
        if layer.blobs:
            h = hashlib.blake2b(digest_size=16)
            for blob in layer.blobs:
                h.update(repr(blob.shape).encode())
                h.update(memoryview(np.ascontiguousarray(blob)).cast("B"))
            digests[layer.name] = h.digest()
        layers.append(layer._replace(blobs=[tuple(b.shape) for b in layer.blobs]))
    return Scan(path, layers, digests, lambda: read_caffemodel(path), nonfinite=nonfinite)
