"""Test helper: write crafted ``.pth`` files (torch.save's zip and legacy layouts, the pickle opcodes written by
hand) with any tensor metadata, including what torch never writes (negative strides, overlapping views, sizes
that do not fit the storage). Valid files for the tests come from real torch.save: ``tests/data/pth/``.

Example:
    >>> import numpy as np
    >>> data = zip_pth({"w": tensor("0", (3,), (1,))}, {"0": np.arange(3, dtype=np.float32)})
    >>> data[:2]
    b'PK'
"""
import io
import pickle
import struct
import zipfile

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _value(obj):
    """Pickle opcodes of a plain value (int, str, bool, tuple / list of them), without the header and STOP."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tensor(key, size, stride, offset=0, storage="FloatStorage", numel=None):
    """Opcodes of ``torch._utils._rebuild_tensor_v2(storage key, offset, size, stride, False, OrderedDict())``;
    ``numel``: the storage's declared element count (None: set by :func:`zip_pth` / :func:`legacy_pth`)."""
    return ("tensor", key, tuple(size), tuple(stride), offset, storage, numel)


def _tensor_opcodes(spec, numels):
    _, key, size, stride, offset, storage, numel = spec
    pid = b"(" + _value("storage") + _global("torch", storage) + _value(key) + _value("cpu") \
        + _value(numels.get(key, 0) if numel is None else numel) + b"tQ"
    empty = _global("collections", "OrderedDict") + b")R"
    return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _value(offset) + _value(size)
            + _value(stride) + _value(False) + empty + b"tR")


def state_pickle(state, numels=None):
    """A protocol-2 pickle of an OrderedDict {name: tensor(...) or plain value} (storages by persistent id)."""
    numels = numels or {}
    out = b"\x80\x02" + _global("collections", "OrderedDict") + b")R"
    for name, spec in state.items():
        body = _tensor_opcodes(spec, numels) if isinstance(spec, tuple) and spec[:1] == ("tensor",) \
            else _value(spec)
        out += _value(name) + body + b"s"
    return out + b"."


def zip_pth(state, storages, pkl=None, compress=zipfile.ZIP_STORED):
    """Bytes of a zip-format .pth: ``archive/data.pkl`` (``pkl`` or :func:`state_pickle`), ``byteorder`` and a
    member ``archive/data/<key>`` per storage (numpy array or raw bytes)."""
    numels = {k: getattr(v, "size", len(v) // 4) for k, v in storages.items()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", state_pickle(state, numels) if pkl is None else pkl)
        z.writestr("archive/byteorder", "little")
        for key, value in storages.items():
            z.writestr(f"archive/data/{key}", value if isinstance(value, bytes) else value.tobytes())
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def legacy_pth(state, storages, counts=None):
    """Bytes of a pre-1.6 .pth: magic, protocol, sys info, the state pickle, the storage keys, then each storage
    as an 8-byte element count (``counts`` overrides it) and its bytes."""
    numels = {k: v.size for k, v in storages.items()}
    out = _value_pickle(LEGACY_MAGIC) + _value_pickle(1001) + pickle.dumps(
        {"protocol_version": 1001, "little_endian": True}, protocol=2) + state_pickle(state, numels)
    out += _value_pickle(list(storages))
    for key, value in storages.items():
        out += struct.pack("<q", (counts or {}).get(key, value.size)) + value.tobytes()
    return out


def _value_pickle(obj):
    return pickle.dumps(obj, protocol=2)
