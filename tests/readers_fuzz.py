"""Test helper: mutate valid weight files and run the readers on them within a time and memory bound (used by
``tests/test_readers_fuzz.py`` and ``benchmarks/fuzz_readers.py``).

A case survives when the reader parses the mutated bytes or raises its own error (``CaffeModelError`` /
``PthError``, one line naming the file), within ``SECONDS`` and ``MEGABYTES`` (traced by tracemalloc, numpy's
buffers included).

Example:
    >>> import random
    >>> seed = seed_files()["net.caffemodel"]
    >>> len(mutate(seed, "caffemodel", random.Random(0), "insert")) > len(seed)
    True
"""
import contextlib
import io
import pathlib
import signal
import tracemalloc
import zipfile

import numpy as np

from deeplab_keras.weights.pth import pth_layers
from tests import caffe_writer as cw

SECONDS = 20.0    # CPU seconds per case: a bounded reader takes < 0.1 s on these seeds (20: margin for a loaded CI)
MEGABYTES = 48    # peak traced allocation per case
PTH = pathlib.Path(__file__).resolve().parent / "data" / "pth"
PTH_SEEDS = ("tensors.pth", "tensors_legacy.pth", "kazuto_coco.pth")
# pickle opcodes a swap may put in place of another (all of protocol 2 and a few of 4)
OPCODES = b"()*.0123FGIJKLMNPQRSTUVXabcdeghijklmopqrstu}~\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x94\x95"


class CaseTimeout(BaseException):
    """A reader ran past the time bound (a BaseException, so that no ``except Exception`` in a reader hides it)."""


def seed_files():
    """{name: bytes} of the valid files the fuzzer mutates: small caffemodels in every blob style (packed,
    legacy, unpacked floats, doubles, V1) with conv / pooling / BatchNorm parameters, and the torch-written
    ``.pth`` fixtures."""
    rng = np.random.default_rng(0)
    conv = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    bn = [np.abs(rng.normal(size=4)).astype(np.float32) for _ in range(2)] + [np.array([2.0], np.float32)]
    layers = [cw.layer("conv1", "Convolution", [conv, bias], conv=dict(num_output=4, kernel=3, dilation=2)),
              cw.layer("bn_conv1", "BatchNorm", bn, bn_eps=1e-5, style="legacy"),
              cw.layer("scale_conv1", "Scale", [bn[0], bn[1]], style="unpacked"),
              cw.layer("pool1", "Pooling", pool=dict(method=0, kernel=3, stride=2, pad=1)),
              cw.layer("fc1_voc12_c0", "Convolution", [conv[:2], bias[:2]], style="double",
                       conv=dict(num_output=2, kernel=3, dilation=6))]
    files = {"net.caffemodel": cw.net(layers),
             "v1.caffemodel": cw.net([cw.layer("conv1", 4, [conv], v1=True, style="unpacked"),
                                      cw.layer("pool1", 17, pool=dict(method=1, kernel=2, stride=2, pad=0), v1=True)],
                                     v1=True)}
    files.update({name: (PTH / name).read_bytes() for name in PTH_SEEDS})
    layers, _ = pth_layers(PTH / "kazuto_coco.pth")  # a whole tiny ResNet-50 + COCO head: analysed to the end
    files["resnet.caffemodel"] = cw.net([cw.layer(x.name, x.type, x.blobs, bn_eps=1e-5 if x.type == "BatchNorm"
                                                  else None) for x in layers])
    return files


def _varint(rng):
    return cw._varint(rng.choice([0, 1, 127, 128, 300, 2 ** 31, 2 ** 32 + 5, 2 ** 63, rng.getrandbits(64)]))


def _mutate_bytes(data, rng, kind):
    data = bytearray(data)
    at = rng.randrange(len(data))
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":  # a varint, or a key / a key and a length
        data[at:at] = _varint(rng) if rng.random() < 0.5 else bytes([rng.choice([0x2d, 0x3a, 0x0a, 0x08, 0x45])])
    elif kind == "length":  # replace the varint at ``at`` by another value (a length, a count, a dim)
        end = at
        while end < len(data) and data[end] & 0x80:
            end += 1
        data[at:end + 1] = _varint(rng)
    elif kind == "repeat":  # a slice repeated (runs of floats, duplicated fields)
        stop = min(len(data), at + rng.randint(1, 64))
        data[at:at] = data[at:stop] * rng.randint(1, 8)
    return bytes(data)


def _mutate_pickle(data, rng):
    """Swap an opcode of the pickle (or insert one): in place for the legacy format, in data.pkl for a zip."""
    def swap(pkl):
        pkl = bytearray(pkl)
        at = rng.randrange(len(pkl))
        if rng.random() < 0.7:
            pkl[at] = rng.choice(OPCODES)
        else:
            pkl[at:at] = bytes([rng.choice(OPCODES)]) + _varint(rng)[:4]
        return bytes(pkl)

    if not data.startswith(b"PK"):
        return swap(data)
    out = io.BytesIO()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                body = src.read(info)
                dst.writestr(info.filename, swap(body) if info.filename.endswith("data.pkl") else body)
    except Exception:  # noqa: BLE001 (an earlier mutation broke the zip: swap a byte of it instead)
        return swap(data)
    return out.getvalue()


KINDS = ("flip", "truncate", "insert", "length", "repeat", "pickle")


def mutate(data, fmt, rng, kind=None):
    """One mutation of ``data`` (a ``fmt`` "caffemodel" or "pth" file): bit flips, truncation, inserted varints,
    changed lengths, repeated slices, or (pth) a swapped pickle opcode."""
    kind = kind or rng.choice(KINDS if fmt == "pth" else KINDS[:-1])
    return _mutate_pickle(data, rng) if kind == "pickle" else _mutate_bytes(data, rng, kind)


@contextlib.contextmanager
def bounded(seconds=SECONDS, megabytes=MEGABYTES):
    """Raise CaseTimeout past ``seconds`` of the process's CPU time (SIGPROF: the main thread only) and
    AssertionError when the traced peak allocation passed ``megabytes``."""
    def alarm(*_):
        raise CaseTimeout(f"a reader ran over {seconds} s")

    previous = signal.signal(signal.SIGPROF, alarm)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_PROF, seconds)  # CPU time: a loaded machine does not trip it
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < megabytes << 20, f"a reader allocated {peak / 2 ** 20:.0f} MB (bound {megabytes} MB)"


def run_case(path, fmt):
    """Read ``path`` as the importer does (every layer, then the network it implies); return "parsed" or
    "refused" (the reader's own one-line error naming the file); anything else propagates."""
    from deeplab_keras.weights.caffe import CaffeModelError, caffemodel_config, read_caffemodel
    from deeplab_keras.weights.pth import PthError, read_pth

    try:
        with bounded():
            if fmt == "pth":
                read_pth(path)
            else:
                for _ in read_caffemodel(path):
                    pass
            caffemodel_config(path)
    except (CaffeModelError, PthError) as e:
        message = str(e)
        assert str(path) in message and "\n" not in message, message
        return "refused"
    return "parsed"
