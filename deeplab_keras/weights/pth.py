"""Read PyTorch ``.pth`` state dicts of kazuto1011/deeplab-pytorch (its converted DeepLab v2 releases) without
torch, and load them into a :class:`DeepLabV2`.

A ``.pth`` written by ``torch.save`` is a zip (``<name>/data.pkl`` + raw little-endian storages
``<name>/data/<key>``), or, before torch 1.6, a sequence of pickles followed by the storages. The pickle is read
by a restricted unpickler that builds only ordered dicts and tensors (as numpy arrays) and refuses every other
global, so a ``.pth`` cannot run code here.

kazuto's names map onto Caffe's, and from there onto the model exactly as :mod:`deeplab_keras.weights.importer`
does: ``[base.]layer1.conv1.{conv,bn}`` = conv1 / bn_conv1 + scale_conv1, ``layer{s}.block{i}.{shortcut,
reduce,conv3x3,increase}.{conv,bn}`` = res{s}{block}_branch{1,2a,2b,2c} (+ bn / scale), ``aspp.c{k}`` = the k-th
ASPP branch in the model's rate order (a state dict does not store the rates: DeepLabV2S files need aspp="S"),
``fc`` = the COCO init's 1x1 classifier (backbone only). BatchNorm eps is kazuto's 1e-5.

Example:
    >>> from deeplab_keras.weights.pth import read_pth
    >>> state = read_pth("deeplabv2_resnet101_msc-vocaug-20000.pth")          # doctest: +SKIP
    >>> state["base.aspp.c0.weight"].shape                                    # doctest: +SKIP
    (21, 2048, 3, 3)
"""
import collections
import io
import math
import os
import pickle
import re
import struct
import zipfile
import zlib

import numpy as np

from deeplab_keras.config_base import is_int
from deeplab_keras.weights.caffe_reader import CaffeLayer, CaffeModelError, Scan, nonfinite_count, printable
from deeplab_keras.weights.importer import load_scan


class PthError(CaffeModelError):
    """A ``.pth`` that cannot be read safely (one-line message naming the file); a :class:`CaffeModelError`, the
    importers' common error (a ValueError)."""


_DTYPES = {"FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
           "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
           "ByteStorage": "u1", "BoolStorage": "?"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


_MAX_PICKLE_BYTES = 64 << 20    # a state dict's data.pkl (the released ResNet-101's is ~100 KB)
_MAX_DIMS = 16                   # dimensions of one tensor
_MAX_DEPTH = 32                  # nesting of dicts / lists / tuples around the tensors
_MAX_INFLATE = 64                # a compressed storage member may inflate at most this much (torch stores them)
_CHUNK = 1 << 24                 # storages are read in chunks of this many bytes
try:  # a zip member may name LZMA compression (bz2's errors are OSError)
    from lzma import LZMAError
    _DECOMPRESS_ERRORS = (LZMAError,)
except ImportError:  # pragma: no cover (Python built without lzma)
    _DECOMPRESS_ERRORS = ()


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Storage:
    def __init__(self, storage_type, key, numel):
        self.dtype, self.key, self.numel = _DTYPES[storage_type.name], printable(key, 64), numel
        self.array = None


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch", "Size"): tuple}


class _Unpickler(pickle._Unpickler):  # noqa: SLF001 (the pure-Python one: its memo is a dict, see below)
    """Builds OrderedDicts, tuples and tensor placeholders; any other global is refused (never imported).

    The pure-Python unpickler (``pickle._Unpickler``): the C one grows its memo to the largest index a
    ``LONG_BINPUT`` names (a 5-byte opcode can ask for 64 GB); this one keeps it in a dict. A state dict's
    pickle is small (~100 KB for the released ResNet-101), so the speed does not matter.
    """

    def __init__(self, file, path):
        super().__init__(file)
        self.path, self.storages = path, {}

    def find_class(self, module, name):
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise PthError(f"{self.path} refers to {printable(module, 60)}.{printable(name, 60)}, which a state dict "
                       "of tensors does not need; refusing to load it (only torch.save(model.state_dict()) files are "
                       "read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and is_int(pid[4]) and pid[4] >= 0):
            raise PthError(f"{self.path}: unsupported storage reference {printable(pid, 80)}")
        key = str(pid[2])
        if key not in self.storages:
            self.storages[key] = _Storage(pid[1], key, int(pid[4]))
        storage = self.storages[key]
        if storage.numel != pid[4] or storage.dtype != _DTYPES[pid[1].name]:
            raise PthError(f"{self.path}: storage {storage.key} is declared twice, with different sizes or types")
        return storage


class _Bounded:
    """A read-only file view that never reads past ``limit`` bytes from where it starts (so a pickle opcode that
    declares a huge length cannot make the unpickler allocate it)."""

    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def readline(self, n=-1):
        data = self.f.readline(self.left if n is None or n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _load_pickle(unpickler, path):
    try:
        return unpickler.load()
    except PthError:
        raise
    except Exception as e:  # a damaged pickle: EOFError, UnpicklingError, MemoryError, ...
        raise PthError(f"{path} is not a readable .pth state dict ({type(e).__name__}: {str(e)[:80]})") from None


def _dtype(code, byteorder):
    if code == "bf16":
        return np.dtype(byteorder + "u2")
    return np.dtype(code if code in ("?", "i1", "u1") else byteorder + code)


def _array(storage, raw, byteorder, path):
    dtype = _dtype(storage.dtype, byteorder)
    if len(raw) < storage.numel * dtype.itemsize:
        raise PthError(f"{path} is truncated: storage {storage.key} needs {storage.numel * dtype.itemsize:,} bytes, "
                       f"has {len(raw):,}")
    data = np.frombuffer(raw, dtype, count=storage.numel)
    if storage.dtype == "bf16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(data.dtype.newbyteorder("="), copy=False)


def _read_exactly(f, n, path, what):
    """``n`` bytes of ``f`` read in chunks (never more than ``n``), or PthError when the file ends first."""
    out = bytearray(n)
    view, done = memoryview(out), 0
    while done < n:
        got = f.readinto(view[done:done + _CHUNK])
        if not got:
            raise PthError(f"{path} is truncated: {what} needs {n:,} bytes, has {done:,}; download the file again")
        done += got
    return out


def _check_tensor(t, path):
    """Check a tensor's offset, sizes and strides against its storage before any view of it is made; return
    the bytes a C-contiguous copy of it takes (0 when it is a contiguous view)."""
    where = f"{path}: a tensor over storage {t.storage.key if isinstance(t.storage, _Storage) else '?'}"
    if not isinstance(t.storage, _Storage) or t.storage.array is None:
        raise PthError(f"{where} has no storage of its own")
    size, stride, offset = t.size, t.stride, t.offset
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= _MAX_DIMS
            and all(map(is_int, size + stride)) and is_int(offset)):
        raise PthError(f"{where} has malformed sizes / strides / offset (integers expected, at most {_MAX_DIMS} "
                       "dimensions)")
    numel = t.storage.array.size
    if min(size, default=1) < 0 or min(stride, default=0) < 0 or offset < 0:
        raise PthError(f"{where} has a negative size, stride or offset (size {size[:8]}, stride {stride[:8]}, "
                       f"offset {offset}); torch never writes one")
    count = math.prod(size)
    if count == 0:
        return 0
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel or count > numel:
        raise PthError(f"{where} of shape {size[:8]} (stride {stride[:8]}, offset {offset}) "
                       + ("runs past" if last >= numel else "repeats the elements of")
                       + f" its storage of {numel:,} elements")
    contiguous = all(s == math.prod(size[i + 1:]) for i, s in enumerate(stride) if size[i] != 1)
    return 0 if contiguous else count * t.storage.array.itemsize


def _materialize(obj, path, budget, depth=0):
    if depth > _MAX_DEPTH:
        raise PthError(f"{path} nests its objects more than {_MAX_DEPTH} levels deep; not a state dict")
    if isinstance(obj, _Tensor):
        budget[0] -= _check_tensor(obj, path)
        if budget[0] < 0:
            raise PthError(f"{path}: its strided tensors would take more memory than its storages hold "
                           "(the same storage viewed over and over); not a state dict")
        base = obj.storage.array
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(base[obj.offset:], obj.size, [s * item for s in obj.stride],
                                               writeable=False)
        return view if view.flags.c_contiguous else np.array(view, order="C")  # no copy of contiguous tensors
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialize(v, path, budget, depth + 1)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, path, budget, depth + 1) for v in obj)
    if isinstance(obj, (_Storage, _StorageType)):
        raise PthError(f"{path} holds a bare storage, not a tensor; not a state dict")
    return obj


def _storage_budget(storages):
    """Bytes the tensor copies may take: twice the storages' own size, plus 16 MB."""
    return [2 * sum(s.array.nbytes for s in storages.values() if s.array is not None) + (16 << 20)]


def _read_zip(path):
    """(object, storages) of a zip-format ``.pth``; each storage is checked against the member that holds it
    (its uncompressed size from the zip directory) before it is read, in chunks."""
    with zipfile.ZipFile(path) as z:
        infos = {info.filename: info for info in z.infolist()}
        pkl = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise PthError(f"{path} is a zip without <name>/data.pkl: not a torch.save file "
                           "(a .keras model? load it with deeplab_keras.weights.load_model)")
        prefix = pkl[0][:-len("data.pkl")]
        if infos[pkl[0]].file_size > _MAX_PICKLE_BYTES:
            raise PthError(f"{path}: its {pkl[0]} has {infos[pkl[0]].file_size:,} bytes, over the reader's cap of "
                           f"{_MAX_PICKLE_BYTES:,} (a state dict's is about 100 KB)")
        byteorder = "little"
        if prefix + "byteorder" in infos:
            byteorder = z.read(prefix + "byteorder")[:16].decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise PthError(f"{path}: unknown byte order {byteorder!r} in {prefix}byteorder")
        with z.open(pkl[0]) as f:
            data = f.read(_MAX_PICKLE_BYTES + 1)  # the zip directory's size may lie: read at most the cap
        if len(data) > _MAX_PICKLE_BYTES:
            raise PthError(f"{path}: its {pkl[0]} inflates past the reader's cap of {_MAX_PICKLE_BYTES:,} bytes")
        unpickler = _Unpickler(io.BytesIO(data), path)
        obj = _load_pickle(unpickler, path)
        order = "<" if byteorder == "little" else ">"
        for key, storage in unpickler.storages.items():
            name = f"{prefix}data/{key}"
            info = infos.get(name)
            if info is None:
                raise PthError(f"{path} lacks the storage {name}")
            need = storage.numel * _dtype(storage.dtype, order).itemsize
            if info.file_size != need:
                raise PthError(f"{path}: member {name} holds {info.file_size:,} bytes, its storage declares "
                               f"{storage.numel:,} elements ({need:,} bytes)")
            if info.compress_type != zipfile.ZIP_STORED and need > _MAX_INFLATE * info.compress_size + 4096:
                raise PthError(f"{path}: member {name} inflates {info.compress_size:,} bytes to {need:,}; refusing "
                               "(torch.save stores its storages uncompressed)")
            if info.compress_type == zipfile.ZIP_STORED and info.header_offset + need > os.path.getsize(path):
                raise PthError(f"{path} is truncated: member {name} needs {need:,} bytes past the end of the file")
            with z.open(info) as f:
                storage.array = _array(storage, _read_exactly(f, need, path, f"storage {name}"), order, path)
    return obj, unpickler.storages


def _read_legacy(path):
    """(object, storages) of a pre-1.6 ``.pth``: pickles, then each storage as an 8-byte count and its bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as raw:
        if raw.read(1) != b"\x80":
            raise PthError(f"{path} is not a .pth file (neither a torch zip nor a torch pickle)")
        raw.seek(0)
        f = _Bounded(raw, size)
        magic = _load_pickle(_Unpickler(f, path), path)
        if not is_int(magic) or magic != _LEGACY_MAGIC:
            raise PthError(f"{path} is a pickle but not a torch.save file")
        _load_pickle(_Unpickler(f, path), path)  # protocol version
        sys_info = _load_pickle(_Unpickler(f, path), path)
        byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
        unpickler = _Unpickler(f, path)
        obj = _load_pickle(unpickler, path)
        keys = _load_pickle(_Unpickler(f, path), path)
        if not isinstance(keys, (list, tuple)) or len(keys) > len(unpickler.storages):
            raise PthError(f"{path}: its storage list is malformed; not a torch.save file")
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise PthError(f"{path}: storage {printable(key, 64)} is listed but not used")
            header = f.read(8)
            if len(header) < 8:
                raise PthError(f"{path} is truncated (storage {storage.key} is missing); download the file again")
            numel = struct.unpack(byteorder + "q", header)[0]
            need = numel * _dtype(storage.dtype, byteorder).itemsize
            if numel != storage.numel or need > f.left:
                raise PthError(f"{path}: storage {storage.key} declares {numel:,} elements here and "
                               f"{storage.numel:,} in its pickle, with {f.left:,} bytes left in the file")
            storage.array = _array(storage, _read_exactly(f, need, path, f"storage {storage.key}"), byteorder, path)
    return obj, unpickler.storages


def read_pth(path):
    """Read a ``torch.save`` file of tensors (a state dict) without torch.

    Every storage's declared size is checked against the bytes that hold it before it is read (in chunks), and
    every tensor's offset, sizes and strides against its storage before it is viewed, so a crafted file cannot
    make the reader allocate more than the file's storages (and twice that for strided copies), read outside a
    storage, or run code.

    Args:
        path: the ``.pth`` (zip format of torch >= 1.6, or the older pickle format).

    Returns:
        the saved object with every tensor as a numpy array (an OrderedDict name -> array for a state dict);
        contiguous tensors are read-only views of their storage, others C-contiguous copies.

    Raises:
        PthError: not a ``.pth``, truncated, malformed, or it refers to anything but tensors and dicts (the only
        exception type this function raises).

    Example:
        >>> {k: v.shape for k, v in read_pth("model.pth").items()}               # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PthError(f"{path} does not exist (or is not a file); pass a .pth file")
    try:
        obj, storages = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except PthError:
        raise
    except OSError as e:
        raise PthError(f"{path} cannot be read ({e.strerror or e}); check the file and its permissions") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, ValueError,
            OverflowError, struct.error, KeyError, zlib.error, *_DECOMPRESS_ERRORS) as e:
        raise PthError(f"{path} is a damaged .pth ({type(e).__name__}: {str(e)[:80]}); download the file again") \
            from None
    missing = [k for k, s in storages.items() if s.array is None]
    if missing:
        raise PthError(f"{path} is truncated (storages {missing[:4]} are missing); download the file again")
    return _materialize(obj, path, _storage_budget(storages))


# ----------------------------------------------------------------------------------------------------------
# kazuto1011/deeplab-pytorch names -> Caffe names (the mapping to Keras is importer.py's)
# ----------------------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"^layer(\d)\.block(\d+)\.(shortcut|reduce|conv3x3|increase)\.(conv|bn)\.(\w+)$")
_BRANCH = {"shortcut": "1", "reduce": "2a", "conv3x3": "2b", "increase": "2c"}
_BN_PARAMS = {"running_mean": 0, "running_var": 1, "weight": 2, "bias": 3}


def _caffe_names(key):
    """kazuto key -> (caffe conv / bn body, 'conv' | 'bn', param) or None."""
    if key.startswith("layer1.conv1."):
        rest = key[len("layer1.conv1."):]
        part, _, param = rest.partition(".")
        return ("conv1" if part == "conv" else "_conv1"), part, param
    m = _BLOCK.match(key)
    if m:
        stage, block, branch, part, param = m.groups()
        letter = "a" if block == "1" else f"b{int(block) - 1}"
        body = f"{stage}{letter}_branch{_BRANCH[branch]}"
        return ("res" + body if part == "conv" else body), part, param
    return None


def _state_dict(obj, path):
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, np.ndarray) and v.dtype != object
                                             for k, v in obj.items()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return _state_dict(obj[key], path)
    raise PthError(f"{path} holds no state dict of tensors")


def pth_layers(path):
    """The state dict of a deeplab-pytorch ``.pth`` as :class:`CaffeLayer` s with Caffe names and blob layout.

    Returns:
        (layers, names): the layers, and {caffe name: the .pth key prefix} for messages.
    """
    return state_layers(_state_dict(read_pth(path), path), path)


def state_layers(state, path):
    """:func:`pth_layers` of a state dict already in memory ({kazuto name: numpy array}); ``path`` names it in
    messages.

    Example:
        >>> layers, names = state_layers({"aspp.c0.weight": np.ones((3, 8, 3, 3), np.float32),
        ...                               "aspp.c0.bias": np.zeros(3, np.float32)}, "mem.pth")
        >>> layers[0].name, names["fc1_pth_c0"]
        ('fc1_pth_c0', 'aspp.c0')
    """
    convs, bns, others, names = {}, {}, [], {}
    for key, value in state.items():
        short = re.sub(r"^(module\.)?(base\.)?", "", key)
        if short.endswith("num_batches_tracked"):
            continue
        mapped = _caffe_names(short)
        if mapped is not None and mapped[1] == "conv" and mapped[2] == "weight":
            convs[mapped[0]] = [value.astype(np.float32, copy=False)]
            names[mapped[0]] = printable(key.rsplit(".", 1)[0])
        elif mapped is not None and mapped[1] == "bn" and mapped[2] in _BN_PARAMS:
            bns.setdefault(mapped[0], [None] * 4)[_BN_PARAMS[mapped[2]]] = value.astype(np.float32, copy=False)
            names["bn" + mapped[0]] = names["scale" + mapped[0]] = printable(key.rsplit(".", 1)[0])
        elif re.match(r"^aspp\.c\d+\.(weight|bias)$", short) or re.match(r"^fc\.(weight|bias)$", short):
            head, param = short.rsplit(".", 1)
            name = f"fc1_pth_c{head.split('.c')[1]}" if head.startswith("aspp") else "fc"
            convs.setdefault(name, [None, None])[0 if param == "weight" else 1] = value.astype(np.float32, copy=False)
            names[name] = printable(key.rsplit(".", 1)[0])
        else:
            others.append(key)
    if others:
        raise PthError(f"{path} has {len(others)} tensors that are not part of kazuto1011/deeplab-pytorch's "
                       f"DeepLabV2 ResNet: {', '.join(map(printable, others[:8]))}"
                      + (" ..." if len(others) > 8 else ""))
    layers = []
    for name, blobs in convs.items():
        if any(b is None for b in blobs):
            raise PthError(f"{path}: {names[name]} lacks its weight or bias")
        layers.append(CaffeLayer(name, "Convolution", blobs))
    for body, (mean, var, gamma, beta) in bns.items():
        if any(b is None for b in (mean, var, gamma, beta)):
            raise PthError(f"{path}: {names['bn' + body]} lacks one of weight, bias, running_mean, running_var")
        layers.append(CaffeLayer("bn" + body, "BatchNorm", [mean, var, np.ones(1, np.float32)],
                                 batch_norm={"eps": 1e-5, "use_global_stats": True}))
        layers.append(CaffeLayer("scale" + body, "Scale", [gamma, beta]))
    return layers, names


def pth_scan(path):
    """The :class:`deeplab_keras.weights.caffe_reader.Scan` of a ``.pth`` (for the importer's checks and loading)."""
    path = os.fspath(path)
    return state_scan(*pth_layers(path), path)


def state_scan(layers, names, path):
    """The :class:`~deeplab_keras.weights.caffe_reader.Scan` of :func:`state_layers`' result."""
    nonfinite = {layer.name: nonfinite_count(layer) for layer in layers}
    return Scan(path, [layer._replace(blobs=[b.shape for b in layer.blobs]) for layer in layers], {},
                lambda: iter(layers), names, {name: n for name, n in nonfinite.items() if n})


def load_pth(model, path, backbone_only=False):
    """Fill a :class:`DeepLabV2` (ResNet) from a deeplab-pytorch ``.pth`` state dict; see
    :func:`deeplab_keras.weights.caffe.load_caffemodel` for the checks, arguments and report.

    Example:
        >>> model = dk.DeepLabV2(21, "resnet101")                                 # doctest: +SKIP
        >>> load_pth(model, "deeplabv2_resnet101_msc-vocaug-20000.pth")["head"]   # doctest: +SKIP
        'loaded'
    """
    return load_scan(model, pth_scan(path), backbone_only)
