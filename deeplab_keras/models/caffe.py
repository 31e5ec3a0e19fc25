"""Import released DeepLab v2 Caffe weights (``.caffemodel``) without Caffe or protobuf.

A ``.caffemodel`` is a binary protobuf ``NetParameter``: a flat sequence of ``layer`` fields (100; the old
``layers`` field 2 of V1 files is read too). This module decodes the wire format itself, one layer at a time
(the file is streamed, never held whole in memory), and maps the layers onto a :class:`DeepLabV2` by name:

=====================================  =====================================================================
Caffe                                  Keras (``model.network``)
=====================================  =====================================================================
conv1 / bn_conv1 / scale_conv1         conv1_conv (bias zeroed: Caffe's has none) / conv1_bn
res{s}{b}_branch{1,2a,2b,2c}           conv{s}_block{i}_{0,1,2,3}_conv (a=1, b=2, ...; b1=2 ... b22=23)
bn{s}{b}_branch* / scale{s}{b}_branch* conv{s}_block{i}_{0,1,2,3}_bn (mean, var / s; gamma, beta)
fc1_{exp}_c{k}                         ASPP branch of the same dilation: aspp_r{rate}_conv
conv{b}_{i}                            block{b}_conv{i} (VGG-16)
fc6[_k] / fc7[_k] / fc8_{exp}[_k]      fc6_r{rate} / fc7_r{rate} / fc8_r{rate} (LargeFOV: rate 12)
=====================================  =====================================================================

Convolution blobs are OIHW (Keras: HWIO); BatchNorm blobs are (mean * s, var * s, [s]) and are divided by s as
Caffe does (s == 0 gives 0); Scale blobs are gamma and beta. Shared-weight copies of the MSC branches
(``<layer>_res075``, ``<layer>_res05``) are checked to equal their shared layer and skipped.

Example:
    >>> import deeplab_keras as dk
    >>> from deeplab_keras.models.caffe import caffemodel_config, convert_caffemodel
    >>> caffemodel_config("train2_iter_20000.caffemodel")                     # doctest: +SKIP
    {'backbone': 'resnet101', 'num_classes': 21, 'aspp': 'L', 'bn_epsilon': 1e-05}
    >>> model = convert_caffemodel("train2_iter_20000.caffemodel", "voc.keras",
    ...                            msc_scales=(1.0, 0.75, 0.5))                 # doctest: +SKIP
"""
import hashlib
import os
import re
import struct
from typing import NamedTuple

import numpy as np

from deeplab_keras.backbones.resnet import RESNET_BLOCKS


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


def _fields(buf, pos, end, float_runs=None):
    """Yield (field, wire type, value) of one message; value is an int (varint), bytes (fixed) or a
    (start, stop) slice for length-delimited fields. Unpacked floats of field ``float_runs`` (one key byte and
    4 bytes per value; ``float_runs`` < 16) come as one float32 array per run of consecutive values."""
    run_key = float_runs << 3 | 5 if float_runs is not None else None
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if key == run_key:
            run = np.frombuffer(buf, np.uint8, count=(end - pos + 1) // 5 * 5, offset=pos - 1).reshape(-1, 5)
            stop = np.flatnonzero(run[:, 0] != run_key)
            n = int(stop[0]) if stop.size else len(run)
            pos += n * 5 - 1
            yield field, wire, np.ascontiguousarray(run[:n, 1:]).view("<f4").ravel()
            continue
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            value = (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value = bytes(buf[pos:pos + size])
            pos += size
        else:
            raise _Corrupt(f"wire type {wire} (field {field})")
        if pos > end:
            raise _Corrupt(f"field {field} runs past the end of its message")
        yield field, wire, value


def _string(buf, span):
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _packed_varints(buf, span):
    out, pos = [], span[0]
    while pos < span[1]:
        value, pos = _varint(buf, pos, span[1])
        out.append(value)
    return out


def _repeated_uint(values, wire, value, buf):
    """Append a repeated uint32 field (proto2 writes it unpacked; accept packed too)."""
    values.extend(_packed_varints(buf, value) if wire == 2 else [value])


def _decode_blob(buf, start, end):
    """BlobProto -> float32 array in its Caffe shape (a view into ``buf`` for packed float data)."""
    chunks, shape, legacy = [], None, [0, 0, 0, 0]
    for field, wire, value in _fields(buf, start, end, float_runs=5):
        if field == 5 and wire == 5:
            chunks.append(value)
        elif field == 5 and wire == 2:
            if (value[1] - value[0]) % 4:
                raise _Corrupt("float data whose length is not a multiple of 4")
            chunks.append(np.frombuffer(buf, "<f4", count=(value[1] - value[0]) // 4, offset=value[0]))
        elif field == 8:  # double_data: rare; converted to float32
            data = np.frombuffer(buf, "<f8", count=(value[1] - value[0]) // 8, offset=value[0]) if wire == 2 \
                else np.frombuffer(value, "<f8")
            chunks.append(data.astype(np.float32))
        elif field == 7 and wire == 2:
            shape = []
            for f, w, v in _fields(buf, *value):
                if f == 1:
                    shape.extend(_packed_varints(buf, v) if w == 2 else [v])
        elif field in (1, 2, 3, 4) and wire == 0:
            legacy[field - 1] = value
    data = chunks[0] if len(chunks) == 1 else (np.concatenate(chunks) if chunks else np.zeros(0, np.float32))
    if shape is None:
        shape = legacy if any(legacy) else [data.size]
    if int(np.prod(shape)) != data.size:
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
        elif field == f_type:
            type_ = _V1_TYPES.get(value, f"V1Type{value}") if (v1 and wire == 0) else _string(buf, value)
        elif field == f_blob and wire == 2:
            blobs.append(_decode_blob(buf, *value))
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


# ----------------------------------------------------------------------------------------------------------
# What the file holds (names -> roles), checked against the model before anything is assigned
# ----------------------------------------------------------------------------------------------------------
_RESNET = re.compile(r"^(res|bn|scale)(\d)([a-z])(\d*)_branch(1|2a|2b|2c)$")
_STEM = {"conv1": "conv", "bn_conv1": "bn", "scale_conv1": "scale"}
_VGG_CONV = re.compile(r"^conv(\d)_(\d)$")
_ASPP = re.compile(r"^fc1_(.+)_c(\d+)$")
_FC = re.compile(r"^fc([678])(?:_(.+?))?(?:_(\d+))?$")
_MSC_COPY = re.compile(r"^(.+)_res\d+$")
_BRANCHES = {"1": 0, "2a": 1, "2b": 2, "2c": 3}
_KINDS = {"res": "conv", "bn": "bn", "scale": "scale"}


def _block_index(letter, number):
    """Caffe's ResNet block names -> Keras block numbers: a, b, c, ... = 1, 2, 3, ...; b1, b2, ... = 2, 3, ..."""
    return int(number) + 1 if number else ord(letter) - ord("a") + 1


def _role(layer):
    """(kind, keras name or head key) for a layer with blobs, or None when the name is not known.

    kind: "conv" | "bn" | "scale" (backbone), "head" (key = (branch, position)), "classifier" (a head that
    is no DeepLab v2 head: ImageNet fc1000, the COCO init's 1x1 classifier).
    """
    name = layer.name
    if name in _STEM:
        return _STEM[name], "conv1_" + ("conv" if name == "conv1" else "bn")
    m = _RESNET.match(name)
    if m:
        kind, stage, letter, number, branch = m.groups()
        suffix = "conv" if kind == "res" else "bn"
        return _KINDS[kind], f"conv{stage}_block{_block_index(letter, number)}_{_BRANCHES[branch]}_{suffix}"
    m = _VGG_CONV.match(name)
    if m and layer.type == "Convolution":
        return "conv", f"block{m.group(1)}_conv{m.group(2)}"
    if layer.type == "Convolution":
        m = _ASPP.match(name)
        if m:
            return "head", (int(m.group(2)), 0)
        m = _FC.match(name)
        if m and (m.group(1) != "8" or m.group(2)):  # fc8 needs its experiment name (fc8_voc12)
            position = int(m.group(1)) - 6
            branch = m.group(3) if m.group(3) else (m.group(2) if m.group(1) != "8" else None)
            if branch is None or branch.isdigit():
                return "head", (int(branch) if branch else 0, position)
        if name.startswith("fc"):
            return "classifier", name
    if layer.type == "InnerProduct":
        return "classifier", name
    return None


class Scan(NamedTuple):
    """What an importer knows about a weights file before loading it (see :func:`load_scan`)."""
    path: str
    layers: list          # CaffeLayer with blobs replaced by their shapes (tuples), file order
    digests: dict         # layer name -> digest of its blobs (to check the MSC copies)
    source: object        # () -> iterator of CaffeLayer with the blobs, for loading
    names: dict = None    # Caffe name -> the file's own name, for messages (.pth)

    def display(self, name):
        return (self.names or {}).get(name, name)


def _scan(path):
    """One streaming pass: every layer's metadata and blob shapes, and a digest of each layer's weights."""
    path = os.fspath(path)
    layers, digests = [], {}
    for layer in read_caffemodel(path):
        if layer.blobs:
            h = hashlib.blake2b(digest_size=16)
            for blob in layer.blobs:
                h.update(repr(blob.shape).encode())
                h.update(memoryview(np.ascontiguousarray(blob)).cast("B"))
            digests[layer.name] = h.digest()
        layers.append(layer._replace(blobs=[tuple(b.shape) for b in layer.blobs]))
    return Scan(path, layers, digests, lambda: read_caffemodel(path))


def scan_weights(path):
    """:class:`Scan` of a ``.caffemodel``, or of a deeplab-pytorch ``.pth`` / ``.pt`` (by the suffix)."""
    if os.fspath(path).endswith((".pth", ".pt")):
        from deeplab_keras.models.pth import pth_scan

        return pth_scan(path)
    return _scan(path)


def _analyse(scan):
    """What network the file holds: backbone, blocks, width, head, classes, rates, pool5a, eps, MSC copies."""
    path = scan.path
    weighted = [layer for layer in scan.layers if layer.blobs]
    if not weighted:
        raise CaffeModelError(f"{path} holds no layers with weights (a deploy net without weights?); "
                              "pass the trained .caffemodel")
    names = {layer.name for layer in weighted}
    roles, msc_copies, unknown = {}, [], []
    for layer in weighted:
        role = _role(layer)
        copy = _MSC_COPY.match(layer.name)
        if copy and copy.group(1) in names:
            msc_copies.append(layer)
        elif role is None:
            unknown.append(layer.name)
        else:
            roles[layer.name] = role
    if unknown:
        raise CaffeModelError(f"{path} has {len(unknown)} layers with weights that are not part of a DeepLab v2 "
                              f"ResNet/VGG-16 network: {', '.join(scan.display(n) for n in unknown[:12])}"
                              + (" ..." if len(unknown) > 12 else ""))
    differing = [c.name for c in msc_copies if scan.digests[c.name] != scan.digests[_MSC_COPY.match(c.name).group(1)]]
    if differing:
        raise CaffeModelError(f"{path}: the MSC branch layers {', '.join(differing[:6])} hold weights that differ "
                              "from their shared layers; a shared-weight DeepLabV2 cannot represent them")
    by_name = {layer.name: layer for layer in weighted}
    out = {"msc_copies": [c.name for c in msc_copies], "roles": roles, "layers": by_name}
    if "conv1_1" in roles:
        out["backbone"] = "vgg16"
    elif "conv1" in roles or any(_RESNET.match(n) for n in roles):
        blocks = {}
        for name in roles:
            m = _RESNET.match(name)
            if m and m.group(1) == "res" and m.group(5) == "2a":
                s = int(m.group(2))
                blocks[s] = max(blocks.get(s, 0), _block_index(m.group(3), m.group(4)))
        stage_blocks = tuple(blocks.get(s, 0) for s in (2, 3, 4, 5))
        if not all(stage_blocks):
            raise CaffeModelError(f"{path} holds a ResNet without blocks in some stage (blocks per stage conv2..conv5: "
                                  f"{stage_blocks}); the file may be truncated")
        known = {blocks: name for name, blocks in RESNET_BLOCKS.items()}
        out["backbone"] = known.get(stage_blocks, "resnet101")
        out["stage_blocks"] = None if stage_blocks in known else stage_blocks  # e.g. ResNet-152 (3, 8, 36, 3)
        eps = {round(float(layer.batch_norm["eps"]), 12) for layer in weighted
               if layer.type == "BatchNorm" and layer.batch_norm}
        out["bn_epsilon"] = eps.pop() if len(eps) == 1 else (1e-5 if not eps else sorted(eps))
    else:
        raise CaffeModelError(f"{path} holds neither a ResNet (conv1, res2a_branch1, ...) nor a VGG-16 "
                              "(conv1_1, ...) backbone")
    stem = by_name.get("conv1_1" if out["backbone"] == "vgg16" else "conv1")
    out["width_multiplier"] = stem.blobs[0][0] / 64 if stem is not None and stem.blobs[0] else 1.0
    pools = [layer for layer in scan.layers if layer.type == "Pooling"]
    if out["backbone"] == "vgg16":
        out["pool5a"] = any(p.name == "pool5a" or (p.pooling and p.pooling["pool"] == "AVE") for p in pools)
    # === head ===
    head = {}
    for name, (kind, key) in roles.items():
        if kind == "head":
            head.setdefault(key[0], {})[key[1]] = by_name[name]
    classifiers = [name for name, (kind, _) in roles.items() if kind == "classifier"]
    out["head_layers"] = [n for n, (kind, _) in roles.items() if kind in ("head", "classifier")]
    out["classifiers"] = classifiers
    out["display"] = scan.display
    if head:
        positions = (0,) if out["backbone"] != "vgg16" else (0, 1, 2)
        for k, branch in sorted(head.items()):
            if tuple(sorted(branch)) != positions:
                have = ", ".join(layer.name for layer in branch.values())
                raise CaffeModelError(f"{path}: head branch {k} is incomplete ({have}); expected "
                                      + ("fc1_<exp>_c<k>" if positions == (0,) else "fc6, fc7 and fc8 layers"))
        branches = [head[k] for k in sorted(head)]
        dilations = [(b[0].convolution or {}).get("dilation", 1) for b in branches]
        out["head"] = branches
        out["rates"] = tuple(dilations) if all(d > 1 for d in dilations) else None
        out["num_classes"] = branches[0][max(positions)].blobs[0][0]
        largefov = out["backbone"] == "vgg16" and len(branches) == 1 and branches[0][0].name == "fc6"
        out["largefov"] = largefov
    elif classifiers:
        weight = by_name[classifiers[-1]].blobs[0]
        out["num_classes"] = weight[-2] if by_name[classifiers[-1]].type == "InnerProduct" else weight[0]
    return out


def _aspp_kwarg(info):
    from deeplab_keras.layers.aspp import ASPP_RATES

    if info.get("largefov"):
        return "largefov"
    rates = info["rates"] or ASPP_RATES["L"][:len(info["head"])]
    for key in ("L", "S"):
        if tuple(rates) == ASPP_RATES[key]:
            return key
    return tuple(rates)


def caffemodel_config(path):
    """The :class:`DeepLabV2` keyword arguments a ``.caffemodel`` implies.

    Returns:
        dict with ``backbone``; ``num_classes`` when the file has a classifier head (the COCO init's 1x1 head
        counts: 91; an ImageNet fc1000 does not); ``aspp`` ("L", "S", "largefov" or rates) when that head is a
        DeepLab v2 ASPP / LargeFOV head; ``pool5a`` (VGG-16: whether the file has the AVE pooling layer);
        ``bn_epsilon`` (ResNet: the BatchNorm eps the file uses, Caffe's default 1e-5).

    Raises:
        CaffeModelError: the file cannot be read or holds no supported network.

    Example:
        >>> cfg = caffemodel_config("train2_iter_20000.caffemodel")              # doctest: +SKIP
        >>> model = dk.DeepLabV2(**cfg, weights="train2_iter_20000.caffemodel")  # doctest: +SKIP
    """
    return _config(_analyse(scan_weights(path)))


def _config(info):
    cfg = {"backbone": info["backbone"]}
    if info.get("head"):
        cfg["num_classes"] = int(info["num_classes"])
        cfg["aspp"] = _aspp_kwarg(info)
    elif info["classifiers"] and not any(info["layers"][n].type == "InnerProduct" for n in info["classifiers"]):
        cfg["num_classes"] = int(info["num_classes"])
    for key, default in (("pool5a", None), ("bn_epsilon", None), ("stage_blocks", None), ("width_multiplier", 1.0)):
        if info.get(key, default) != default:
            cfg[key] = info[key]
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Loading into a DeepLabV2
# ----------------------------------------------------------------------------------------------------------
def _weighted_layers(model, with_head):
    """{keras name: layer} of ``model.network``'s weighted layers, ASPP branch layers included when asked."""
    network = model.network
    targets = {layer.name: layer for layer in network.layers if layer.weights and layer.name != "aspp"}
    heads = {}
    if with_head:
        for branch in network.get_layer("aspp").branches:
            weighted = [layer for layer in branch if layer.weights]
            rate = int(weighted[0].dilation_rate[0])
            heads[rate] = weighted
            targets.update({layer.name: layer for layer in weighted})
    return targets, heads


def _describe_head(info):
    names = [info["display"](n) for n in info["head_layers"]]
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def _check_fits(path, caffe, shapes, role, layer):
    """Raise when the file's blob shapes do not fit the Keras layer."""
    if role == "conv":
        kh, kw, cin, cout = (int(d) for d in layer.kernel.shape)
        if tuple(shapes[0]) != (cout, cin, kh, kw):
            raise CaffeModelError(f"{path}: layer {caffe} has weights of shape {tuple(shapes[0])} (OIHW); the model's "
                                  f"{layer.name} needs {(cout, cin, kh, kw)} (kernel {(kh, kw, cin, cout)} HWIO); "
                                  "build the model the file was made for (see caffemodel_config)")
        if len(shapes) > 2 or (len(shapes) == 2 and (layer.bias is None or int(np.prod(shapes[1])) != cout)):
            raise CaffeModelError(f"{path}: layer {caffe} has blobs {[tuple(b) for b in shapes]}; the model's "
                                  f"{layer.name} has a kernel {(kh, kw, cin, cout)} and "
                                  f"{'a bias' if layer.bias is not None else 'no bias'}")
        return
    channels = int(layer.moving_mean.shape[0])
    counts = (3,) if role == "bn" else (1, 2)
    used = shapes[:2] if role == "bn" else shapes
    if len(shapes) not in counts or any(int(np.prod(b)) != channels for b in used):
        raise CaffeModelError(f"{path}: {'BatchNorm' if role == 'bn' else 'Scale'} layer {caffe} has blobs "
                              f"{[tuple(b) for b in shapes]}; the model's {layer.name} has {channels} channels")


def _check_eps(path, info, targets):
    eps = info["bn_epsilon"]
    if isinstance(eps, list):
        raise CaffeModelError(f"{path}: its BatchNorm layers use several eps values {eps}; not supported")
    model_eps = sorted({float(layer.epsilon) for layer in targets.values() if hasattr(layer, "moving_mean")})
    wrong = [e for e in model_eps if abs(e - eps) > 1e-4 * eps]
    if wrong:
        raise CaffeModelError(f"{path}: its BatchNorm eps is {eps:g}, the model's {wrong[0]:g}: build the model "
                              f"with bn_epsilon={eps:g}")


def _plan(model, scan, backbone_only):
    """Check the whole file against ``model``; return ({caffe name: (role, keras layer)}, report)."""
    path = scan.path
    info = _analyse(scan)
    vgg = info["backbone"] == "vgg16"
    if vgg != (model.backbone == "vgg16"):
        raise CaffeModelError(f"{path} holds a {info['backbone']} backbone; the model is a {model.backbone}: "
                              f"build it with backbone={info['backbone']!r}")
    if not vgg:
        blocks = info["stage_blocks"] or RESNET_BLOCKS[info["backbone"]]
        model_blocks = tuple(model.stage_blocks or RESNET_BLOCKS[model.backbone])
        if model_blocks != blocks:
            raise CaffeModelError(f"{path} holds a ResNet with {blocks} blocks per stage (conv2..conv5), the model "
                                  f"{model_blocks}: build it with "
                                  + (f"backbone={info['backbone']!r}" if not info["stage_blocks"]
                                     else f"stage_blocks={blocks}"))
    has_head = bool(info.get("head"))
    targets, heads = _weighted_layers(model, with_head=not backbone_only)
    head_targets = {}
    if not backbone_only:
        if not has_head:
            classifiers = ", ".join(map(info["display"], info["classifiers"]))
            what = (f"its classifier {classifiers} is not a DeepLab v2 ASPP/LargeFOV head" if classifiers
                    else "it has no classifier head (a backbone-only init, or a truncated file?)")
            raise CaffeModelError(f"{path}: {what}; load its backbone only (backbone_only=True, --backbone-only) "
                                  "and train a fresh head")
        if int(info["num_classes"]) != model.num_classes:
            raise CaffeModelError(f"{path} holds a {info['num_classes']}-class head ({_describe_head(info)}); the "
                                  f"model has {model.num_classes} classes: use num_classes={info['num_classes']}, or "
                                  "backbone_only=True for a fresh head")
        rates = info["rates"] or tuple(sorted(heads))[:len(info["head"])]
        if sorted(rates) != sorted(heads):
            raise CaffeModelError(f"{path} has ASPP branches with rates {tuple(rates)}; the model's are "
                                  f"{tuple(sorted(heads))}: build it with aspp={_aspp_kwarg(info)!r}")
        for rate, branch in zip(rates, info["head"]):
            head_targets.update({layer.name: heads[rate][position] for position, layer in branch.items()})
        if info["backbone"] == "vgg16":
            model_pool5a = any(layer.name.endswith("pool5a") for layer in model.network.layers)
            if model_pool5a != info["pool5a"]:
                raise CaffeModelError(f"{path} {'has' if info['pool5a'] else 'has no'} pool5a (AVE 3x3 pooling "
                                      f"after pool5); build the model with pool5a={info['pool5a']}")
    plan, ignored = {}, []
    for name, (kind, key) in info["roles"].items():  # file order
        if kind in ("head", "classifier"):
            if name in head_targets:
                plan[name] = ("conv", head_targets[name])
            else:
                ignored.append(name)
            continue
        if key not in targets:
            raise CaffeModelError(f"{path}: layer {scan.display(name)} has no counterpart {key} in the model; build "
                                  "the model the file was made for (see caffemodel_config)")
        plan[name] = (kind, targets[key])
    for name, (role, layer) in plan.items():
        _check_fits(path, scan.display(name), info["layers"][name].blobs, role, layer)
    if info["backbone"] != "vgg16":
        _check_eps(path, info, targets)
    filled = {(layer.name, role) for role, layer in plan.values()}
    missing = [name for name, layer in targets.items()
               if (name, "conv" if hasattr(layer, "kernel") else "bn") not in filled]
    if missing:
        raise CaffeModelError(f"{path} has no weights for {len(missing)} of the model's layers "
                              f"({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); the file may be "
                              "truncated or made for another network")
    report = {"source": path, "backbone": info["backbone"], "num_classes": info.get("num_classes"),
              "aspp": _aspp_kwarg(info) if has_head else None, "head": "fresh" if backbone_only else "loaded",
              "loaded": list(plan), "keras_layers": len({layer.name for _, layer in plan.values()}),
              "msc_copies": info["msc_copies"], "ignored": ignored,
              "zero_bias": sorted(layer.name for name, (role, layer) in plan.items() if role == "conv"
                                  and layer.bias is not None and len(info["layers"][name].blobs) == 1),
              "bn_without_scale": sorted(n for n, layer in targets.items()
                                         if hasattr(layer, "moving_mean") and (n, "scale") not in filled)}
    for key in ("pool5a", "bn_epsilon"):
        if key in info:
            report[key] = info[key]
    return plan, report


def _assign(role, layer, blobs):
    """Write one Caffe layer's blobs into its Keras layer (conversions as in the module docstring)."""
    if role == "conv":
        layer.kernel.assign(np.transpose(blobs[0], (2, 3, 1, 0)))
        if layer.bias is not None:
            layer.bias.assign(blobs[1].reshape(-1) if len(blobs) > 1 else np.zeros(layer.bias.shape, np.float32))
    elif role == "bn":  # Caffe: statistics * (0 if s == 0 else 1 / s)
        s = float(blobs[2].reshape(-1)[0])
        factor = 0.0 if s == 0 else 1.0 / s
        layer.moving_mean.assign((blobs[0].reshape(-1).astype(np.float64) * factor).astype(np.float32))
        layer.moving_variance.assign((blobs[1].reshape(-1).astype(np.float64) * factor).astype(np.float32))
    else:
        layer.gamma.assign(blobs[0].reshape(-1))
        layer.beta.assign(blobs[1].reshape(-1) if len(blobs) > 1 else np.zeros(layer.beta.shape, np.float32))


def load_caffemodel(model, path, backbone_only=False):
    """Fill a :class:`DeepLabV2` with the weights of a ``.caffemodel``.

    The whole file is checked against the model first (one streaming pass: names, shapes, classes, ASPP
    rates, pool5a, BatchNorm eps, MSC copies), then the weights are streamed in (a second pass), so a file
    that does not fit leaves the model untouched.

    Args:
        model: a DeepLabV2 built as the file implies (see :func:`caffemodel_config`).
        path: the ``.caffemodel``.
        backbone_only: take only the backbone (ImageNet / COCO inits); the ASPP head keeps its fresh weights.

    Returns:
        report dict: ``loaded`` (Caffe layers copied, file order), ``msc_copies`` (MSC branch copies checked
        equal to their shared layers and skipped), ``ignored`` (head / classifier layers not loaded, e.g. with
        ``backbone_only``), ``zero_bias`` (Keras convs whose bias was set to 0: Caffe's has none),
        ``bn_without_scale`` (identity gamma/beta), and ``backbone``, ``num_classes``, ``aspp``, ``pool5a`` /
        ``bn_epsilon`` as the file has them.

    Raises:
        CaffeModelError: unreadable file, or it does not fit the model (the message says what to change).

    Example:
        >>> model = dk.DeepLabV2(21, "resnet101", msc_scales=(1.0, 0.75, 0.5))     # doctest: +SKIP
        >>> load_caffemodel(model, "train2_iter_20000.caffemodel")["msc_copies"][:2]  # doctest: +SKIP
        ['conv1_res075', 'bn_conv1_res075']
    """
    return load_scan(model, _scan(path), backbone_only)


def load_scan(model, scan, backbone_only=False):
    """Check ``scan`` (see :func:`scan_weights`) against ``model``, then load its weights; see
    :func:`load_caffemodel`."""
    plan, report = _plan(model, scan, backbone_only)
    for layer in scan.source():
        if layer.name in plan:
            role, target = plan[layer.name]
            _assign(role, target, layer.blobs)
    for name in report["bn_without_scale"]:  # Caffe BatchNorm without a Scale layer: identity affine
        layer = model.network.get_layer(name)
        layer.gamma.assign(np.ones(layer.gamma.shape, np.float32))
        layer.beta.assign(np.zeros(layer.beta.shape, np.float32))
    return report


def convert(src, backbone=None, num_classes=None, msc_scales=None, backbone_only=False, **model_kwargs):
    """Build the DeepLabV2 a ``.caffemodel`` (or deeplab-pytorch ``.pth``) implies, the given arguments checked
    against it, and load it.

    Returns:
        (model, report): see :func:`convert_caffemodel` for the arguments, :func:`load_caffemodel` for the report.
    """
    from deeplab_keras.models.deeplab import DeepLabV2

    scan = scan_weights(src)
    info = _analyse(scan)
    cfg = _config(info)
    if backbone is not None and backbone != cfg["backbone"]:
        raise CaffeModelError(f"{src} holds a {cfg['backbone']} backbone, not {backbone}: use --backbone "
                              f"{cfg['backbone']}")
    if backbone_only:
        if num_classes is None:
            raise CaffeModelError("a fresh head needs its class count: pass num_classes (--num-classes)")
        for key in ("num_classes", "aspp"):
            cfg.pop(key, None)
        if cfg["backbone"] == "vgg16":
            cfg.pop("pool5a", None)
    elif num_classes is not None and "num_classes" in cfg and num_classes != cfg["num_classes"]:
        raise CaffeModelError(f"{src} holds a {cfg['num_classes']}-class head ({_describe_head(info)}), not "
                              f"{num_classes} classes: use --num-classes {cfg['num_classes']}, or --backbone-only "
                              "for a fresh head")
    for key, value in model_kwargs.items():
        if key in cfg and value != cfg[key] and not (backbone_only and key == "aspp"):
            raise CaffeModelError(f"{src} implies {key}={cfg[key]!r}, not {value!r}")
    kwargs = {**cfg, **model_kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if "num_classes" not in kwargs:
        raise CaffeModelError(f"{src} has no DeepLab v2 head; pass backbone_only=True (--backbone-only) and "
                              "num_classes for a fresh head")
    model = DeepLabV2(msc_scales=msc_scales, **kwargs)
    report = load_scan(model, scan, backbone_only)
    return model, report


def check_output(out, overwrite):
    """Raise before any work when ``out`` cannot take a ``.keras`` model (wrong suffix, exists, no folder)."""
    out = os.fspath(out)
    if not out.endswith(".keras"):
        raise CaffeModelError(f"output {out} must end with .keras")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise CaffeModelError(f"output folder {folder} does not exist")
    return out


def save_keras(model, out, overwrite):
    """``model.save(out)`` atomically (a temporary file and a rename: nothing half written)."""
    from deeplab_keras.utils import atomic_path

    with atomic_path(out, overwrite=overwrite) as tmp:
        model.save(tmp)


def convert_caffemodel(src, out=None, *, backbone=None, num_classes=None, msc_scales=None, backbone_only=False,
                       overwrite=False, **model_kwargs):
    """Build the :class:`DeepLabV2` a ``.caffemodel`` implies, load it, and optionally save it as ``.keras``.

    Args:
        src: the ``.caffemodel``.
        out: a ``.keras`` path to write (atomically; nothing is written on any error), or None.
        backbone, num_classes: checked against the file (None: take the file's); with ``backbone_only``
            ``num_classes`` is the fresh head's class count.
        msc_scales: e.g. (1.0, 0.75, 0.5) for the released MSC models (the weights are shared by all scales).
        backbone_only: load the backbone only (ImageNet / COCO inits) and keep a fresh ASPP head.
        overwrite: replace an existing ``out``.
        **model_kwargs: other DeepLabV2 arguments (e.g. ``aspp`` for a fresh head, ``dropout``).

    Returns:
        the loaded DeepLabV2.

    Raises:
        CaffeModelError: unreadable file, or arguments that contradict it.
        FileExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> model = convert_caffemodel("init.caffemodel", "coco_init.keras", num_classes=21,
        ...                            backbone_only=True)                    # doctest: +SKIP
    """
    if out is not None:
        out = check_output(out, overwrite)
    model, _ = convert(src, backbone=backbone, num_classes=num_classes, msc_scales=msc_scales,
                       backbone_only=backbone_only, **model_kwargs)
    if out is not None:
        save_keras(model, out, overwrite)
    return model
