"""The weight-file readers and the importer on crafted input (issue #22 rows S1-S4, W1, D1, C1): every malformed
file is the reader's own one-line error naming the file, within a time and memory bound; non-finite weights and
files that do not fit are refused before any variable changes."""
import pickle
import struct
import zipfile

import numpy as np
import pytest

from deeplab_keras.weights import caffe_reader
from deeplab_keras.weights.caffe import CaffeModelError, caffemodel_config, load_caffemodel, read_caffemodel
from deeplab_keras.weights.pth import PthError, load_pth, read_pth, state_layers, state_scan
from tests import caffe_writer as cw
from tests import pth_writer as pw
from tests.conftest import REPO, tiny_model
from tests.readers_fuzz import bounded

F32 = np.arange(6, dtype=np.float32)


def _refused(error, path, call, **bounds):
    """Run ``call(path)`` (exhausting a generator) within the bounds; return the one-line message of ``error``."""
    with pytest.raises(error) as e, bounded(**bounds):
        result = call(path)
        if hasattr(result, "__next__"):
            list(result)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    return message


def _conv1_layer(*fields):
    """A 'conv1' Convolution layer whose blob is made of the given encoded BlobProto fields."""
    return cw.bytes_field(1, "conv1") + cw.bytes_field(2, "Convolution") + cw.bytes_field(7, b"".join(fields))


def _caffemodel(tmp_path, *layers, name="bad.caffemodel"):
    path = tmp_path / name
    path.write_bytes(cw.net(list(layers)))
    return path


# === S1: a float key with fewer than 4 bytes after it (the reader stepped backwards and looped forever) ===
def test_s1_short_float_run_is_refused_not_looped(tmp_path):
    path = tmp_path / "s1.caffemodel"
    path.write_bytes(cw.bytes_field(100, cw.bytes_field(1, "c") + cw.bytes_field(2, "C")
                                    + cw.bytes_field(7, b"\x2d\x00\x00")))
    assert len(path.read_bytes()) == 14
    for call in (read_caffemodel, caffemodel_config):
        assert "not a .caffemodel" in _refused(CaffeModelError, path, call, seconds=5)


# === S4: alternating single unpacked floats and varints (every float run rescanned the blob: quadratic) ===
def test_s4_float_runs_are_scanned_linearly(tmp_path, monkeypatch):
    pairs = 5000
    body = (cw.float_field(5, 1.5) + cw.varint_field(1, 1)) * pairs + cw.bytes_field(7, cw.bytes_field(1, b"\x01"))
    path = _caffemodel(tmp_path, cw.layer("data", "Input"), _conv1_layer(body))
    scanned = []
    real = np.frombuffer

    def counting(buffer, dtype=float, count=-1, offset=0):
        scanned.append(count if count >= 0 else len(buffer) - offset)
        return real(buffer, dtype, count, offset)

    monkeypatch.setattr(caffe_reader.np, "frombuffer", counting)
    with pytest.raises(CaffeModelError, match="holds 5000 values"), bounded(seconds=20):
        list(read_caffemodel(path))
    assert sum(scanned) < 20 * len(body), f"{sum(scanned):,} bytes scanned for a {len(body):,}-byte blob"


# === S2 / S3: .pth tensors that do not fit their storage ===
@pytest.mark.parametrize("size,stride,offset,message", [
    ((3,), (-1,), 2, "negative size, stride or offset"),
    ((2,), (1,), -4, "negative size, stride or offset"),
    ((2, 3), (3, 1), 1, "runs past its storage of 6 elements"),
    ((200_000_000,), (0,), 0, "repeats the elements of its storage"),
    ((2 ** 62, 2 ** 62), (1, 1), 0, "runs past"),
    ((3,), (2 ** 70,), 0, "runs past"),
])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_s2_s3_tensor_checked_against_its_storage(tmp_path, layout, size, stride, offset, message):
    state = {"w": pw.tensor("0", size, stride, offset)}
    path = tmp_path / f"{layout}.pth"
    path.write_bytes(pw.zip_pth(state, {"0": F32}) if layout == "zip" else pw.legacy_pth(state, {"0": F32}))
    assert message in _refused(PthError, path, read_pth, megabytes=16)


def test_s3_member_sizes_checked_before_reading(tmp_path):
    """A deflated member that inflates far past what its storage declares is never read whole; a storage
    declaring more than its member holds is refused before allocating."""
    big = tmp_path / "bomb.pth"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pw.state_pickle({"w": pw.tensor("0", (6,), (1,))}, {"0": 6}))
        with z.open("archive/data/0", "w") as member:
            for _ in range(32):
                member.write(bytes(1 << 20))
    assert big.stat().st_size < 100_000
    assert "holds 33,554,432 bytes, its storage declares 6 elements" in _refused(PthError, big, read_pth,
                                                                                megabytes=16)
    liar = tmp_path / "liar.pth"
    liar.write_bytes(pw.zip_pth({"w": pw.tensor("0", (6,), (1,), numel=10 ** 9)}, {"0": F32}))
    assert "its storage declares 1,000,000,000 elements" in _refused(PthError, liar, read_pth, megabytes=16)


# === C1: malformed fields ===
@pytest.mark.parametrize("fields,message", [
    ((cw.bytes_field(5, F32[:1].tobytes()), cw.bytes_field(7, b"")), "0 dimensions"),              # empty shape
    ((cw.bytes_field(5, b""), cw.bytes_field(7, cw.bytes_field(1, b"\x00\x03"))), "every dimension"),  # zero dim
    ((cw.bytes_field(7, cw.float_field(1, 1.0)),), "dimension of wire type 5"),               # fixed32 dim
    ((cw.varint_field(8, 3),), "blob field 8 has wire type 0"),                               # wrong wire type
    ((cw.bytes_field(5, b""), cw.bytes_field(7, cw.bytes_field(1, cw._varint(2 ** 40) * 2))), "every dimension"),
    ((cw.bytes_field(7, cw.bytes_field(1, b"\x01" * 100)),), "more than 64 values"),
    ((cw.bytes_field(5, b"\x00" * 7),), "not a multiple of 4"),
])
def test_c1_malformed_caffemodel_fields(tmp_path, fields, message):
    good = cw.layer("data", "Input")
    path = _caffemodel(tmp_path, good, _conv1_layer(*fields))
    for call in (read_caffemodel, caffemodel_config):
        assert message in _refused(CaffeModelError, path, call)


def test_c1_layer_type_of_the_wrong_wire_type(tmp_path):
    path = _caffemodel(tmp_path, cw.layer("data", "Input"), cw.bytes_field(1, "conv1") + cw.varint_field(2, 4))
    assert "layer field 2 has wire type 0" in _refused(CaffeModelError, path, caffemodel_config)


def test_c1_deep_pickle_and_huge_legacy_header(tmp_path):
    deep = tmp_path / "deep.pth"
    depth = 3000
    deep.write_bytes(pw.zip_pth({}, {}, pkl=b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."))
    assert "more than 32 levels deep" in _refused(PthError, deep, read_pth)
    huge = tmp_path / "huge.pth"
    huge.write_bytes(pw.legacy_pth({"w": pw.tensor("0", (6,), (1,))}, {"0": F32}, counts={"0": 2 ** 58}))
    assert "declares 288,230,376,151,711,744 elements here" in _refused(PthError, huge, read_pth, megabytes=16)
    memo = tmp_path / "memo.pth"  # LONG_BINPUT at index 2**31: the C unpickler would grow its memo to 32 GB
    memo.write_bytes(pw.zip_pth({}, {}, pkl=b"\x80\x02}r" + struct.pack("<I", 2 ** 31) + b"."))
    assert read_pth(memo) == {}


def test_c1_non_tensor_state_and_bare_storage(tmp_path):
    path = tmp_path / "ints.pth"
    path.write_bytes(pw.zip_pth({"w": 3}, {}, pkl=pickle.dumps({1: 2}, protocol=2)))
    assert "holds no state dict of tensors" in _refused(PthError, path, lambda p: load_pth(None, p))


# === W1: NaN / Inf weights are refused by the importer, naming the layer ===
@pytest.fixture(scope="module")
def source():
    """A randomized tiny ResNet-50 (width 1/32) and its Caffe layers."""
    model = cw.randomize(tiny_model(3, "resnet50", width_multiplier=1 / 32), seed=5)
    return model, cw.keras_to_caffe(model, bn_scale=2.0)


def _weights(model):
    return [w.copy() for w in model.network.get_weights()]


def _unchanged(model, before):
    for a, b in zip(model.network.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def _with_blob(layers, name, blobs, **kw):
    """``layers`` with the layer ``name`` re-encoded with other blobs."""
    out = []
    for encoded in layers:
        layer = caffe_reader._decode_layer(encoded, v1=False)
        out.append(cw.layer(name, layer.type, blobs, **kw) if layer.name == name else encoded)
    return out


@pytest.mark.parametrize("layer,bad", [("res3a_branch2b", np.nan), ("bn3a_branch2b", np.inf),
                                       ("bn_conv1", 1e-44)])
def test_w1_nonfinite_weights_refused_naming_the_layer(tmp_path, source, layer, bad):
    model, layers = source
    blobs = [np.array(b) for b in next(caffe_reader._decode_layer(x, False) for x in layers
                                       if caffe_reader._decode_layer(x, False).name == layer).blobs]
    if layer.startswith("bn") and bad < 1:  # a scale factor s so small that mean / s overflows
        blobs[2][...] = bad
    else:
        blobs[0].reshape(-1)[3] = bad
    path = _caffemodel(tmp_path, *_with_blob(layers, layer, blobs))
    target = tiny_model(3, "resnet50", width_multiplier=1 / 32)
    before = _weights(target)
    message = _refused(CaffeModelError, path, lambda p: load_caffemodel(target, p))
    assert f"layer {layer} holds" in message and "NaN or infinite values" in message
    assert "nan" not in message.replace("NaN", "").lower() and "inf " not in message
    _unchanged(target, before)


def test_w1_nonfinite_pth_state(source):
    state = {"aspp.c0.weight": np.full((3, 64, 3, 3), np.nan, np.float32), "aspp.c0.bias": np.zeros(3, np.float32)}
    scan = state_scan(*state_layers(state, "mem.pth"), "mem.pth")
    assert scan.nonfinite == {"fc1_pth_c0": 3 * 64 * 9}


# === D1: a layer name twice, the first copy of another shape: refused before any variable changes ===
def test_d1_every_copy_of_a_repeated_name_is_checked_first(tmp_path, source):
    model, layers = source
    names = [caffe_reader._decode_layer(x, False).name for x in layers]
    at = names.index("res5a_branch2c")
    wrong = cw.layer("res5a_branch2c", "Convolution", [np.ones((7, 5, 1, 1), np.float32)],
                     conv=dict(num_output=7, kernel=1, bias=False))
    path = _caffemodel(tmp_path, *layers[:at], wrong, *layers[at:])
    target = tiny_model(3, "resnet50", width_multiplier=1 / 32)
    before = _weights(target)
    message = _refused(CaffeModelError, path, lambda p: load_caffemodel(target, p))
    assert "layer res5a_branch2c has weights of shape (7, 5, 1, 1)" in message
    assert "numpy=" not in message and "Variable" not in message
    _unchanged(target, before)
    good = _caffemodel(tmp_path, *layers[:at], layers[at], *layers[at:], name="twice.caffemodel")
    assert load_caffemodel(target, good)["num_classes"] == 3  # two equal copies load
    for a, b in zip(target.network.get_weights(), model.network.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_c1_classifier_of_too_few_dimensions(tmp_path):
    """An InnerProduct classifier with a 1-D weight blob (analyse read its dimension -2: IndexError)."""
    from deeplab_keras.weights.pth import pth_layers

    layers, _ = pth_layers(REPO / "tests" / "data" / "pth" / "kazuto_coco.pth")
    encoded = [cw.layer(x.name, x.type, x.blobs) for x in layers if x.name != "fc"]
    path = _caffemodel(tmp_path, *encoded, cw.layer("fc1000", "InnerProduct", [np.ones(5, np.float32)]))
    assert "layer fc1000 has weights of shape (5,)" in _refused(CaffeModelError, path, caffemodel_config)


def test_c1_zip_member_with_a_wrong_compression_method(tmp_path):
    """Stored members marked deflated (a flipped bit found by the fuzz run): zlib.error escaped the reader."""
    data = bytearray(pw.zip_pth({"w": pw.tensor("0", (6,), (1,))}, {"0": F32}))
    for signature, field in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local headers, central directory
        at = data.find(signature)
        while at >= 0:
            data[at + field] = zipfile.ZIP_DEFLATED
            at = data.find(signature, at + 4)
    path = tmp_path / "deflated.pth"
    path.write_bytes(bytes(data))
    assert "is a damaged .pth (error: Error -3" in _refused(PthError, path, read_pth)
